"""A trainer that builds its weight-sync group exactly as SGLang's ``init_custom_process_group`` does -- the
helper slime copies as ``slime/utils/distributed_utils.py::init_process_group`` (OpenRLHF, AReaL and SkyRL
carry the same) -- syncs weights into routereplay: real processes, gloo on CPU, no mocks.

The trainer is its own process: torch's ``rendezvous("tcp://...")`` hosts the store (rank 0 is master),
``PrefixStore(group_name)`` over it, then torch's private ``_new_process_group_helper`` (which adds
``group_name + "/"`` and ``cpu/``). It drives the server the way slime's
``update_weight_from_distributed.py`` does: ``/init_weights_update_group`` in a thread while it joins,
then per sync ``/update_weights_from_distributed`` in a thread while it broadcasts every tensor in names
order. The next rollout (greedy, with routing) must equal offline generation on the same weights saved
to disk. TP=1 goes through the server; TP=2 at the engine level (``join_weight_group`` /
``receive_weights`` on an ``LLM`` with two ranks), and through a TP=2 server once the server calls them.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import queue
import threading
import traceback
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from tests.test_server import MAX_MODEL_LEN, Server, _free_port

GROUP = "slime-pp_0-1"  # the name from the user's report (/slime-pp_0-1/slime-pp_0-1//cpu//0/1)
PROMPT = [9, 8, 7, 6, 5]
NEW_TOKENS = 8
TIMEOUT_S = 60.0


# ---- the trainer's end, written from SGLang's description --------------------------------------------
def sglang_style_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                       timeout: timedelta) -> torch.distributed.ProcessGroup:
    """What SGLang's ``init_custom_process_group`` (slime: ``init_process_group``) builds."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    made = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                     timeout=timeout)
    pg = made[0] if isinstance(made, tuple) else made  # torch >= 2.2 returns (group, store)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # so dist.broadcast(group=pg) maps ranks
    return pg


def _broadcast_all(pg, tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    for work in [dist.broadcast(t, src=0, group=pg, async_op=True) for t in tensors]:
        work.wait()


def _meta(items: list[tuple[str, torch.Tensor]]) -> dict:
    return {"names": [n for n, _ in items], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in items],
            "shapes": [list(t.shape) for _, t in items]}


def _syncs(trained_dir: str) -> list[list[tuple[str, torch.Tensor]]]:
    """Sync 1 has a name the server does not have (refused after every broadcast); sync 2 is the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32)
    items = [(n, p.detach().contiguous()) for n, p in model.named_parameters()]
    return [[items[0], ("model.layers.0.nope", torch.zeros(3))], items]


def http_trainer(url: str, port: int, world_size: int, trained_dir: str, timeout_s: float, out) -> None:
    """(a process) slime's calls against ``url``: join, a refused sync, a good sync, destroy."""
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        syncs = _syncs(trained_dir)
        body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": world_size,
                "group_name": GROUP, "backend": "gloo"}
        result: dict = {}
        joining = threading.Thread(target=lambda: result.update(
            r=httpx.post(url + "/init_weights_update_group", json=body, timeout=2 * timeout_s)))
        joining.start()
        pg = sglang_style_group("gloo", f"tcp://127.0.0.1:{port}", world_size, 0, GROUP, timedelta(seconds=timeout_s))
        joining.join()
        replies = [(result["r"].status_code, result["r"].json())]
        assert httpx.post(url + "/pause_generation", json={}, timeout=30).status_code == 200
        assert httpx.get(url + "/flush_cache", timeout=30).status_code == 200
        for items in syncs:
            body = {**_meta(items), "group_name": GROUP, "flush_cache": False}
            sending = threading.Thread(target=lambda b=body: result.update(
                r=httpx.post(url + "/update_weights_from_distributed", json=b, timeout=2 * timeout_s)))
            sending.start()
            _broadcast_all(pg, [t for _, t in items])
            sending.join()
            replies.append((result["r"].status_code, result["r"].json()))
        assert httpx.post(url + "/continue_generation", json={}, timeout=30).status_code == 200
        r = httpx.post(url + "/destroy_weights_update_group", json={"group_name": GROUP}, timeout=30)
        replies.append((r.status_code, r.json()))
        dist.destroy_process_group(pg)
        out.put(("ok", replies))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def engine_trainer(port: int, world_size: int, trained_dir: str, out) -> None:
    """(a process) the same syncs for a test that drives the engine itself: each sync's names, dtypes and
    shapes go to the test through ``out`` (what the HTTP body carries), then the broadcasts."""
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        syncs = _syncs(trained_dir)
        pg = sglang_style_group("gloo", f"tcp://127.0.0.1:{port}", world_size, 0, GROUP, timedelta(seconds=TIMEOUT_S))
        for items in syncs:
            out.put(("sync", _meta(items)))
            _broadcast_all(pg, [t for _, t in items])
        dist.destroy_process_group(pg)
        out.put(("ok", None))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def sglang_server(out) -> None:
    """(a process) a real SGLang server's side of weight sync, reduced to it: its HTTP calls, the group built
    by ``init_custom_process_group`` at rank ``rank_offset`` (one tensor-parallel rank), each tensor received
    with ``dist.broadcast``; ``GET /received`` tells what arrived. Replies as SGLang's: success and message."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import torch.distributed as dist

    state: dict = {"received": {}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply({"tp_size": 1} if self.path == "/server_info" else state["received"])

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if self.path == "/init_weights_update_group":
                state["pg"] = sglang_style_group(
                    body["backend"], f"tcp://{body['master_address']}:{body['master_port']}", body["world_size"],
                    body["rank_offset"], body["group_name"], timedelta(seconds=TIMEOUT_S))
            elif self.path == "/update_weights_from_distributed":
                for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
                    buf = torch.empty(shape, dtype=getattr(torch, dtype))
                    dist.broadcast(buf, src=0, group=state["pg"])
                    state["received"][name] = [buf.flatten().tolist(), body.get("weight_version")]
            elif self.path == "/destroy_weights_update_group":
                dist.destroy_process_group(state.pop("pg"))
            self._reply({"success": True, "message": "Succeeded."})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    out.put(server.server_address[1])
    server.serve_forever()


def _start(target, *args) -> tuple[multiprocessing.Process, multiprocessing.Queue]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out), daemon=True)
    proc.start()
    return proc, out


def _take(out, proc, timeout: float = 3 * TIMEOUT_S):
    try:
        kind, value = out.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"the trainer said nothing in {timeout:g} s (exit code {proc.exitcode})") from None
    assert kind != "error", f"the trainer failed:\n{value}"
    return kind, value


# ---- what the next rollout must be ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The served checkpoint after a pretend optimizer step (every weight perturbed), saved to disk."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = str(tmp_path_factory.mktemp("trained"))
    hf.save_pretrained(path)
    return path


_GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, return_routed_experts=True)


def offline(model_dir: str, **kwargs) -> tuple[list[int], np.ndarray]:
    """Tokens and routing ([T, MoE layers, top_k], experts sorted) of the rollout on these weights."""
    llm = LLM(model_dir, max_model_len=MAX_MODEL_LEN, block_size=8, routing_replay={"enable": True}, **kwargs)
    try:
        return rollout(llm)
    finally:
        llm.close()


def rollout(llm: LLM) -> tuple[list[int], np.ndarray]:
    c = llm.generate(prompt_token_ids=[PROMPT], sampling_params=_GREEDY, use_tqdm=False)[0].outputs[0]
    return list(c.token_ids), np.sort(np.asarray(c.routed_experts), -1)


def server_rollout(srv: Server, model_dir: str) -> tuple[list[int], np.ndarray]:
    """The same rollout from the server's SGLang /generate: routing is base64 int32, [T, layers, top_k]
    (every layer, SGLang's layout, or only the MoE layers)."""
    config = json.loads(Path(model_dir, "config.json").read_text())
    body = {"input_ids": PROMPT, "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}}
    r = httpx.post(srv.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    flat = np.frombuffer(base64.b64decode(got["meta_info"]["routed_experts"]), "<i4")
    rows, k, layers = len(PROMPT) + NEW_TOKENS - 1, config["num_experts_per_tok"], config["num_hidden_layers"]
    routing = flat.reshape(rows, -1, k)
    if routing.shape[1] == layers:  # SGLang's layout: keep the MoE layers' rows
        moe = [i for i in range(layers) if routing[:, i].any()]
        routing = routing[:, moe]
    return got["output_ids"], np.sort(routing, -1)


def _same(got: tuple[list[int], np.ndarray], want: tuple[list[int], np.ndarray]) -> None:
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])


# ---- the server (TP=1: its /init_weights_update_group calls make_group, the SGLang layout) ------------
def _server_sync(srv: Server, ckpt: str, trained: str, world_size: int, timeout_s: float = TIMEOUT_S) -> None:
    before = server_rollout(srv, ckpt)
    want = offline(trained)
    assert want[0] != before[0], "the perturbation does not change the rollout: perturb more"
    port = _free_port()
    proc, out = _start(http_trainer, srv.url, port, world_size, trained, timeout_s)
    _, replies = _take(out, proc)
    proc.join(30)
    (join_code, join), (bad_code, bad), (good_code, good), (destroy_code, _) = replies
    assert join_code == 200 and join["success"], join
    assert bad_code == 400 and "nope" in bad["error"]["message"], bad  # received, discarded, reported
    assert good_code == 200 and good["num_tensors"] == len(_syncs(trained)[1]), good
    assert destroy_code == 200
    _same(server_rollout(srv, ckpt), want)
    # our trainer end: the world size from /server_info (1 + the server's ranks), the original weights back
    from transformers import AutoModelForCausalLM

    from routereplay.weight_sync import WeightSender

    original = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with WeightSender(srv.url, master_port=_free_port(), group_name=GROUP, timeout_s=timeout_s) as sender:
        assert sender.send(original.named_parameters()) == len(list(original.parameters()))
    _same(server_rollout(srv, ckpt), before)


def test_sglang_trainer_syncs_a_server(ckpt: str, trained: str, tmp_path: Path) -> None:
    srv = Server(ckpt, tmp_path / "server.log", "--routing-replay", json.dumps({"enable": True}),
                 "--weight-group-timeout", str(TIMEOUT_S))
    try:
        _server_sync(srv, ckpt, trained, world_size=2)
    finally:
        srv.stop()


def test_sglang_trainer_syncs_a_tensor_parallel_server(ckpt: str, trained: str, tmp_path: Path) -> None:
    """world_size = 1 + 2: each of the server's ranks joins (1 and 2) and loads its own shard."""
    srv = Server(ckpt, tmp_path / "server.log", "--routing-replay", json.dumps({"enable": True}),
                 "--weight-group-timeout", "8", "--tensor-parallel-size", "2", "--device", "cpu",
                 "--num-kv-blocks", "64")
    try:
        _server_sync(srv, ckpt, trained, world_size=3, timeout_s=8)
    finally:
        srv.stop()


# ---- the engine under tensor parallelism --------------------------------------------------------------
def test_sglang_trainer_syncs_a_tensor_parallel_engine(ckpt: str, trained: str) -> None:
    """Ranks 1 and 2 of a world of 3 are the engine's two tensor-parallel ranks, each receiving every
    broadcast into its own shard; a wrong name is received and discarded on both, the weights unchanged;
    then the next rollout is offline generation's on the saved weights. A world without room for both
    ranks is refused before any rendezvous."""
    from routereplay.weight_sync import WeightGroupError, parse_dtype

    want = offline(trained)
    llm = LLM(ckpt, max_model_len=MAX_MODEL_LEN, block_size=8, routing_replay={"enable": True},
              tensor_parallel_size=2, device="cpu", num_kv_blocks=64)
    try:
        before = rollout(llm)
        with pytest.raises(ValueError, match=r"world_size=2 leaves no room for this server's 2 tensor-parallel"):
            llm.engine.check_weight_group(1, 2, "gloo")
        with pytest.raises(ValueError, match="world_size=2"):
            llm.engine.join_weight_group("127.0.0.1", _free_port(), 1, 2, GROUP, "gloo", timeout_s=5)
        # nobody hosts the rendezvous: every rank gives up within the timeout and leaves the name free
        with pytest.raises(WeightGroupError, match=r"tensor-parallel rank 0: .*rank 1 of 3.*nobody hosts.*; "
                                                   r"tensor-parallel rank 1: .*rank 2 of 3"):
            llm.engine.join_weight_group("127.0.0.1", _free_port(), 1, 3, GROUP, "gloo", timeout_s=2)
        port = _free_port()
        proc, out = _start(engine_trainer, port, 3, trained)
        handle = llm.engine.join_weight_group("127.0.0.1", port, 1, 3, GROUP, "gloo", timeout_s=TIMEOUT_S)
        assert handle.tp_size == 2
        try:
            for i in range(2):
                _, meta = _take(out, proc)
                args = (meta["names"], [parse_dtype(d) for d in meta["dtypes"]], meta["shapes"])
                if i == 0:
                    with pytest.raises(ValueError, match="nope"):
                        llm.engine.receive_weights(handle, *args)
                    _same(rollout(llm), before)  # nothing written, on either rank
                else:
                    assert llm.engine.receive_weights(handle, *args) == len(meta["names"])
            assert _take(out, proc)[0] == "ok"
        finally:
            llm.engine.leave_weight_group(handle)
            proc.join(30)
        _same(rollout(llm), want)
    finally:
        llm.close()


def test_weight_sender_syncs_an_sglang_server() -> None:
    """Our trainer end against SGLang's side of the protocol: WeightSender reads the world size from
    /server_info, hosts the rendezvous, and SGLang's group (made by torch's rendezvous and
    _new_process_group_helper) receives the tensors, with the weight version."""
    from routereplay.weight_sync import WeightSender

    proc, out = _start(sglang_server)
    try:
        url = f"http://127.0.0.1:{out.get(timeout=60)}"
        tensors = [("a.weight", torch.arange(6.0).reshape(2, 3)), ("b.bias", torch.tensor([-1.5, 2.5]))]
        with WeightSender(url, master_port=_free_port(), group_name=GROUP, timeout_s=30) as sender:
            assert sender.send(tensors, weight_version="7") == 2
        got = httpx.get(url + "/received", timeout=10).json()
        assert got == {name: [t.flatten().tolist(), "7"] for name, t in tensors}
    finally:
        proc.kill()
        proc.join(10)


def test_make_group_keys_are_sglangs(tmp_path: Path) -> None:
    """The wire keys: gloo's address of rank r under /{G}/{G}//cpu//0/r, what a trainer waits for."""
    import torch.distributed as dist

    from routereplay.weight_sync import make_group

    port = _free_port()
    got: dict = {}
    joining = threading.Thread(target=lambda: got.update(pg=make_group("127.0.0.1", port, 1, 2, GROUP, "gloo", 20)))
    timeout = timedelta(seconds=20)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timeout, wait_for_workers=False)
    joining.start()
    probe = dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timeout)
    store.wait([f"{GROUP}/{GROUP}//cpu//0/1"])  # TCPStore adds the leading "/"
    assert probe.check([f"{GROUP}/{GROUP}//cpu//0/1"])
    pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", dist.PrefixStore(f"{GROUP}/", dist.PrefixStore(GROUP, store))),
                               0, 2, timeout)
    joining.join(20)
    buf = torch.zeros(2)
    work = got["pg"].broadcast(buf, 0)
    pg.broadcast(torch.tensor([3.0, 4.0]), 0).wait()
    work.wait()
    assert buf.tolist() == [3.0, 4.0]
    got["pg"].shutdown()
    pg.shutdown()
