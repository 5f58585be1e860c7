"""The OpenAI-compatible server end to end: a real uvicorn subprocess, driven by the official client."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from openai import BadRequestError, NotFoundError, OpenAI

from routereplay.routing import decode, from_sglang
from routereplay.store import LocalStore, RedisStore
from routereplay.tiny import make_tiny_checkpoint

MODEL = "tiny-moe"  # --served-model-name
MAX_MODEL_LEN = 256
START_TIMEOUT_S = 90.0
L_MOE, TOP_K, NUM_EXPERTS, VOCAB = 2, 2, 8, 128  # the tiny qwen3_moe checkpoint
MOE_LAYER_IDS, NUM_LAYERS = [1, 3], 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m routereplay.cli serve ...` on a free loopback port; stdout+stderr go to `log_path`."""

    def __init__(self, model_dir: str, log_path: Path, *args: str, wait: bool = True) -> None:
        self.cmd = [sys.executable, "-m", "routereplay.cli", "serve", "--model", model_dir,
                    "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "8",
                    *args]
        self.log_path = log_path
        self.launch()
        if wait:
            self.wait_ready()

    def launch(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*self.cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        relaunches = 2  # the probed port can be taken before the server binds it
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if relaunches and "address already in use" in self.log().lower():
                    relaunches -= 1
                    self.launch()
                    continue
                break
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # bounded poll: the server imports torch and loads the model first
        self.stop()
        raise RuntimeError(f"server did not come up; log tail:\n{self.log()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM (graceful: the engine is closed and the store flushed); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stop_gracefully(self) -> None:
        """Stop and check the shutdown was graceful (uvicorn re-raises SIGTERM once it is done)."""
        rc = self.stop()
        tail = self.log()[-3000:]
        assert rc in (0, -signal.SIGTERM), tail
        assert "engine closed" in tail and f"Finished server process [{self.proc.pid}]" in tail, tail

    def restart(self) -> None:
        self.stop_gracefully()
        self.launch()
        self.wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}

    def post(self, path: str, body: object = None, content: bytes | None = None) -> httpx.Response:
        if content is not None:
            return httpx.post(self.url + path, content=content, headers={"content-type": "application/json"},
                              timeout=60)
        return httpx.post(self.url + path, json=body, timeout=60)


@pytest.fixture(scope="module")
def tok(ckpt: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def servers(ckpt: str, tmp_path_factory: pytest.TempPathFactory):
    """Two servers started side by side (startup is mostly single-threaded imports).

    "srv": routing on, local store, routing returned only on request; tests may restart it, it is
    running whenever a test starts. "plain": routing capture off.
    """
    base = tmp_path_factory.mktemp("srv")
    store_dir = base / "store"
    rr = {"enable": True, "store": "local", "local_store_dir": str(store_dir), "return_routed_experts": False}
    srv = Server(ckpt, base / "server.log", "--routing-replay", json.dumps(rr), wait=False)
    srv.base, srv.store_dir = base, store_dir
    plain = Server(ckpt, tmp_path_factory.mktemp("plain") / "server.log", wait=False)
    try:
        srv.wait_ready()
        plain.wait_ready()
        yield {"srv": srv, "plain": plain}
    finally:
        srv.stop()
        plain.stop()
    srv.stop_gracefully()
    plain.stop_gracefully()


@pytest.fixture
def srv(servers: dict) -> Server:
    return servers["srv"]


def complete(c: OpenAI, prompt: object = (5, 6, 7, 8), **extra: object):
    """A short sampled completion with routing returned; `extra` goes into the body."""
    body = {"ignore_eos": True, "return_routed_experts": True, **extra}
    return c.completions.create(model=MODEL, prompt=list(prompt), max_tokens=4, temperature=1.0, seed=1,
                                extra_body=body)


def check_routing(routing: np.ndarray, num_tokens: int, start: int = 0) -> None:
    assert routing.dtype == np.uint8 and routing.shape == (num_tokens - 1 - start, L_MOE, TOP_K)
    assert routing.max() < NUM_EXPERTS
    assert (routing[..., 0] != routing[..., 1]).all()  # K distinct experts per (token, layer)


# ---- the OpenAI surface ----------------------------------------------------------------------------
def test_models_health_metrics(srv: Server) -> None:
    assert [m.id for m in srv.client().models.list().data] == [MODEL]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    m = srv.metrics()
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "queue_depth",
                 "store_queue_depth", "store_errors_total"):
        assert f"routereplay_{name}" in m


def test_health_generate_runs_the_engine_and_stores_nothing(srv: Server) -> None:
    """SGLang's /health_generate (slime's heartbeat): a token really generated, no routing stored; during a
    pause (weight sync) it answers without waiting for a step."""
    store = LocalStore(srv.store_dir)
    keys, before = set(store.keys()), srv.metrics()
    assert httpx.get(srv.url + "/health_generate", timeout=30).json() == {"status": "ok",
                                                                         "checked": "generated 1 token"}
    after = srv.metrics()
    assert after["routereplay_requests_total"] - before["routereplay_requests_total"] == 1
    assert after["routereplay_generation_tokens_total"] - before["routereplay_generation_tokens_total"] == 1
    assert after["routereplay_store_written_total"] == before["routereplay_store_written_total"]
    assert set(store.keys()) == keys
    srv.post("/pause_generation")
    try:
        assert httpx.get(srv.url + "/health_generate", timeout=30).json() == {"status": "ok", "checked": "paused"}
    finally:
        srv.post("/continue_generation")
    stream = srv.client().completions.create(model=MODEL, prompt=[5, 6], max_tokens=MAX_MODEL_LEN - 2,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # a long rollout is running: its steps answer, no probe is queued behind it
    busy = srv.metrics()["routereplay_requests_total"]
    assert httpx.get(srv.url + "/health_generate", timeout=30).json() == {"status": "ok", "checked": "recent step"}
    assert srv.metrics()["routereplay_requests_total"] == busy
    stream.close()


def test_completion_stream_equals_nonstream(srv: Server, tok) -> None:
    c = srv.client()
    kw = dict(model=MODEL, prompt="Hello routing", max_tokens=12, temperature=0, logprobs=1)
    extra = {"ignore_eos": True, "return_routed_experts": True}
    ch = c.completions.create(**kw, extra_body={**extra, "rollout_id": "cmp-a"}).choices[0]
    prompt_ids = tok("Hello routing")["input_ids"]
    assert ch.finish_reason == "length" and len(ch.token_ids) == 12
    assert ch.prompt_token_ids == prompt_ids
    assert ch.text == tok.decode(ch.token_ids, skip_special_tokens=True)
    lps = ch.logprobs.token_logprobs
    assert len(lps) == 12 and all(lp <= 0 for lp in lps) and len(ch.logprobs.tokens) == 12
    routing = decode(ch.routed_experts)
    check_routing(routing, len(prompt_ids) + 12)
    assert ch.routing_key == "cmp-a" and ch.routing_error is None
    np.testing.assert_array_equal(LocalStore(srv.store_dir).get("cmp-a"), routing)  # readable at once

    chunks = list(c.completions.create(**kw, stream=True, extra_body={**extra, "rollout_id": "cmp-b"}))
    parts = [k.choices[0] for k in chunks]
    assert len(parts) > 2  # really streamed, token by token
    assert "".join(p.text for p in parts) == ch.text
    assert sum((p.token_ids for p in parts), []) == ch.token_ids
    streamed_lps = sum((p.logprobs.token_logprobs for p in parts if p.logprobs), [])
    np.testing.assert_allclose(streamed_lps, lps, atol=1e-5)
    final = parts[-1]
    assert [p.finish_reason for p in parts[:-1]] == [None] * (len(parts) - 1) and final.finish_reason == "length"
    assert all(getattr(p, "routed_experts", None) is None for p in parts[:-1])
    np.testing.assert_array_equal(decode(final.routed_experts), routing)
    assert final.routing_key == "cmp-b"
    np.testing.assert_array_equal(LocalStore(srv.store_dir).get("cmp-b"), routing)


def test_stop_strings_cut_text_and_stream_holds_back(srv: Server, tok) -> None:
    c = srv.client()
    kw = dict(model=MODEL, prompt="Hello routing", max_tokens=16, temperature=0)
    extra = {"ignore_eos": True, "return_routed_experts": True}
    free = c.completions.create(**kw, extra_body=extra).choices[0]
    stop = free.text[5:8]
    start = free.text.find(stop)
    ends = next(k for k in range(1, 17) if stop in tok.decode(free.token_ids[:k], skip_special_tokens=True))
    ch = c.completions.create(**kw, stop=[stop, "never-seen"], extra_body=extra).choices[0]
    assert ch.finish_reason == "stop" and ch.text == free.text[:start]
    assert ch.token_ids == free.token_ids[:ends]  # the token completing the stop string stays
    n = len(ch.prompt_token_ids) + len(ch.token_ids) - 1
    np.testing.assert_array_equal(decode(ch.routed_experts), decode(free.routed_experts)[:n])
    parts = [k.choices[0] for k in c.completions.create(**kw, stop=stop, stream=True, extra_body=extra)]
    assert "".join(p.text for p in parts) == ch.text  # no piece of the stop string was streamed
    assert sum((p.token_ids for p in parts), []) == ch.token_ids and parts[-1].finish_reason == "stop"
    kept = {**extra, "include_stop_str_in_output": True}
    assert c.completions.create(**kw, stop=stop, extra_body=kept).choices[0].text == free.text[: start + len(stop)]
    parts = [k.choices[0] for k in c.completions.create(**kw, stop=stop, stream=True, extra_body=kept)]
    assert "".join(p.text for p in parts) == free.text[: start + len(stop)]


def test_tensor_parallel_server_matches_and_stores(srv: Server, ckpt: str, tmp_path: Path) -> None:
    """`serve --tensor-parallel-size 2` (gloo ranks on CPU): the same greedy tokens and routing as the
    TP=1 server, routing stored, and the workers leave with the server."""
    store_dir = tmp_path / "store"
    rr = {"enable": True, "store": "local", "local_store_dir": str(store_dir)}
    tp = Server(ckpt, tmp_path / "tp.log", "--routing-replay", json.dumps(rr), "--tensor-parallel-size", "2",
                "--device", "cpu", "--num-kv-blocks", "64")
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    workers = [int(line.split()[0]) for line in ps if int(line.split()[1]) == tp.proc.pid and "spawn_main" in line]
    try:
        assert len(workers) == 1, ps
        kw = dict(model=MODEL, prompt="Hello routing", max_tokens=8, temperature=0)
        extra = {"ignore_eos": True, "return_routed_experts": True, "rollout_id": "tp-a"}
        one = srv.client().completions.create(**kw, extra_body=extra).choices[0]
        two = tp.client().completions.create(**kw, extra_body=extra).choices[0]
        assert two.token_ids == one.token_ids and two.text == one.text
        np.testing.assert_array_equal(np.sort(decode(two.routed_experts), -1), np.sort(decode(one.routed_experts), -1))
        np.testing.assert_array_equal(LocalStore(str(store_dir)).get("tp-a"), decode(two.routed_experts))
    finally:
        tp.stop_gracefully()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker exits on the server's close; its zombie is reaped by init
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a tensor-parallel worker outlived the server"


def test_chat_without_max_tokens_runs_to_the_context_limit(srv: Server) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    ch = srv.client().chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0]
    assert ch.finish_reason == "length" and len(ch.prompt_token_ids) + len(ch.token_ids) == MAX_MODEL_LEN


def test_update_weights_from_disk(srv: Server, ckpt: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from routereplay import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "step1")
    other = make_tiny_checkpoint(str(tmp_path / "other"), "mixtral")  # other names and shapes
    prompt = [5, 6, 7, 8, 9]

    def greedy() -> list[int]:
        return srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].token_ids

    before = greedy()
    r = srv.post("/update_weights_from_disk", {"model_path": str(tmp_path / "step1")})
    assert r.status_code == 200 and r.json()["success"] and r.json()["num_tensors"] > 0, r.text
    after = greedy()
    offline = LLM(str(tmp_path / "step1"), max_model_len=MAX_MODEL_LEN, block_size=8)
    expect = offline.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    offline.close()
    assert after == expect and after != before
    for body, message in [({"model_path": str(tmp_path / "missing")}, "is not a directory"),
                          ({"model_path": other}, "update_weights"), ({"model_path": 3}, "model_path")]:
        r = srv.post("/update_weights_from_disk", body)
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == "model_path", r.text
        assert message in r.json()["error"]["message"]
        assert greedy() == after  # nothing was written
    assert srv.post("/update_weights_from_disk", {"model_path": ckpt}).status_code == 200
    assert greedy() == before


@pytest.fixture(scope="module")
def step2(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The server's checkpoint after a pretend training step: every weight perturbed."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path_factory.mktemp("step2"))
    hf.save_pretrained(path)
    return path


def test_pause_sync_continue_keeps_a_queued_rollout_on_the_new_weights(srv: Server, ckpt: str, step2: str) -> None:
    """The RL service loop: pause, queue a rollout, sync weights, continue: the rollout is generated entirely
    by the new weights (its tokens equal offline generation on the saved checkpoint)."""
    from routereplay import LLM, SamplingParams

    prompt = [9, 8, 7, 6]
    assert srv.post("/pause_generation").json()["paused"] is True
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(srv.client().completions.create, model=MODEL, prompt=prompt, max_tokens=8,
                                  temperature=0, extra_body={"ignore_eos": True})
            _wait_until_queued(srv, 1)  # the engine thread holds the request; it cannot step: paused
            assert srv.metrics()["routereplay_paused"] == 1
            assert not pending.done()
            assert srv.post("/update_weights_from_disk", {"model_path": step2}).status_code == 200
            assert srv.post("/continue_generation").json()["paused"] is False
            tokens = pending.result(timeout=60).choices[0].token_ids
    finally:
        srv.post("/continue_generation")
        srv.post("/update_weights_from_disk", {"model_path": ckpt})
    offline = LLM(step2, max_model_len=MAX_MODEL_LEN, block_size=8)
    expect = offline.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    offline.close()
    assert tokens == expect


def test_weights_from_a_trainer_over_a_process_group(srv: Server, ckpt: str, step2: str) -> None:
    """SGLang's /init_weights_update_group + /update_weights_from_distributed, driven by routereplay's
    WeightSender over gloo: the server then generates what the trainer's weights generate; a wrong name
    changes nothing and leaves the group usable."""
    from transformers import AutoModelForCausalLM

    from routereplay import LLM, SamplingParams
    from routereplay.weight_sync import WeightSender

    prompt = [9, 8, 7, 6]

    def greedy() -> list[int]:
        return srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].token_ids

    trained = AutoModelForCausalLM.from_pretrained(step2, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    offline = LLM(step2, max_model_len=MAX_MODEL_LEN, block_size=8)
    expect = offline.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    offline.close()
    before = greedy()
    assert before != expect
    sender = WeightSender(srv.url, master_port=_free_port(), backend="gloo")
    try:
        assert sender.send(trained.named_parameters()) == len(list(trained.parameters()))
        assert greedy() == expect
        bad = [next(trained.named_parameters()), ("model.layers.0.nope", torch.zeros(3))]
        with pytest.raises(RuntimeError, match="nope"):
            sender.send(bad)
        assert greedy() == expect  # nothing written
        sender.send(original.named_parameters())  # still in step with the server
        assert greedy() == before
    finally:
        sender.close()
        srv.post("/update_weights_from_disk", {"model_path": ckpt})
    for path, body, param in [
        ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]],
                                              "group_name": "gone"}, "group_name"),
        ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                        "world_size": 2, "backend": "nccl"}, "backend"),
        ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0,
                                        "world_size": 2, "backend": "gloo"}, "rank_offset"),
    ]:
        r = srv.post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_pause_modes_on_a_rollout_in_flight(srv: Server, ckpt: str, step2: str) -> None:
    """SGLang's pause modes: abort (the default) ends the rollout with what it generated; in_place resumes it
    unchanged; retract + weight sync recomputes it, so all of its routing comes from the new weights."""
    from routereplay import LLM, SamplingParams

    prompt = [4, 5, 6, 7]
    n = MAX_MODEL_LEN - len(prompt)  # long: the pause lands mid-rollout even on a slow, loaded machine

    def rollout(pause: dict | None, sync: bool = False) -> tuple[list[int], object]:
        parts = []
        try:
            for chunk in srv.client().completions.create(
                    model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                    extra_body={"ignore_eos": True, "return_routed_experts": True}):
                parts.append(chunk.choices[0])
                if len(parts) == 2:  # mid-rollout; while paused no step runs
                    assert srv.post("/pause_generation", pause).json()["paused"] is True
                    if sync:
                        assert srv.post("/update_weights_from_disk", {"model_path": step2}).status_code == 200
                    srv.post("/continue_generation")
        finally:
            srv.post("/continue_generation")
            srv.post("/update_weights_from_disk", {"model_path": ckpt})
        return sum((p.token_ids for p in parts), []), parts[-1]

    uninterrupted = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                    extra_body={"ignore_eos": True}).choices[0].token_ids
    tokens, final = rollout(None)
    assert final.finish_reason == "abort" and 2 <= len(tokens) < n and uninterrupted[: len(tokens)] == tokens
    tokens, final = rollout({"mode": "in_place"})
    assert final.finish_reason == "length" and tokens == uninterrupted
    tokens, final = rollout({"mode": "retract"}, sync=True)
    assert final.finish_reason == "length" and len(tokens) == n
    new = LLM(step2, max_model_len=MAX_MODEL_LEN, block_size=8, routing_replay={"enable": True})
    prefill = new.generate(prompt_token_ids=[prompt + tokens[:-1]], sampling_params=SamplingParams(
        max_tokens=1, return_routed_experts=True), use_tqdm=False)[0].outputs[0].routed_experts
    new.close()
    np.testing.assert_array_equal(np.sort(decode(final.routed_experts), -1), np.sort(prefill, -1))
    assert srv.post("/pause_generation", {"mode": "later"}).status_code == 400


def _wait_until_queued(srv: Server, depth: int) -> None:
    deadline = time.monotonic() + 30
    while srv.metrics()["routereplay_queue_depth"] < depth and time.monotonic() < deadline:
        time.sleep(0.02)  # until the engine thread holds the request
    assert srv.metrics()["routereplay_queue_depth"] == depth


def test_abort_request_returns_partial_rollouts(srv: Server) -> None:
    """SGLang's /abort_request: a rollout ended by rid returns finish_reason abort, its tokens a prefix of the
    uninterrupted run, its routing exact for them (and stored); abort_all ends a queued /generate empty."""
    c = srv.client()
    prompt = [5, 6, 7, 8, 9]
    n = MAX_MODEL_LEN - len(prompt)  # long: the abort lands mid-rollout even on a slow, loaded machine
    kw = dict(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    extra = {"ignore_eos": True, "return_routed_experts": True}
    full = c.completions.create(**kw, extra_body={**extra, "rollout_id": "ab-full"}).choices[0]
    parts = []
    try:
        for chunk in c.completions.create(**kw, stream=True, extra_body={**extra, "rollout_id": "ab-1"}):
            parts.append(chunk.choices[0])
            if len(parts) == 2:  # pause: no step runs between here and the abort
                srv.post("/pause_generation", {"mode": "in_place"})
                assert srv.post("/abort_request", {"rid": "ab-1"}).json() == {"success": True, "aborted": 1}
                srv.post("/continue_generation")
    finally:
        srv.post("/continue_generation")
    final = parts[-1]
    tokens = sum((p.token_ids for p in parts), [])
    assert final.finish_reason == "abort" and 2 <= len(tokens) < n
    assert full.token_ids[: len(tokens)] == tokens
    routing = decode(final.routed_experts)
    np.testing.assert_array_equal(routing, decode(full.routed_experts)[: len(prompt) + len(tokens) - 1])
    np.testing.assert_array_equal(LocalStore(srv.store_dir).get("ab-1"), routing)

    srv.post("/pause_generation")
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(srv.post, "/generate", {
                "input_ids": prompt, "rid": "ab-gen", "return_routed_experts": True,
                "sampling_params": {"max_new_tokens": 20}})
            _wait_until_queued(srv, 1)
            assert srv.post("/abort_request", {"abort_all": True}).json() == {"success": True, "aborted": 1}
            got = pending.result(timeout=60).json()
    finally:
        srv.post("/continue_generation")
    assert got["output_ids"] == [] and got["meta_info"]["finish_reason"]["type"] == "abort"
    assert "routed_experts" not in got["meta_info"] and "routing rows computed" in got["meta_info"]["routing_error"]
    for bad in ({}, {"rid": 5}, {"rid": "x", "all": True}):
        r = srv.post("/abort_request", bad)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("rid", "all"), r.text


def test_sglang_generate_matches_completions_and_routing(srv: Server, tok) -> None:
    """SGLang's native /generate as slime calls it: the same tokens, log-probs and routing as /v1/completions."""
    prompt = [5, 6, 7, 8, 9, 10]
    ch = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                         extra_body={"ignore_eos": True, "return_routed_experts": True}).choices[0]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "return_routed_experts": True, "rid": "gen-a"}
    r = srv.post("/generate", body)
    assert r.status_code == 200, r.text
    got = r.json()
    meta = got["meta_info"]
    assert got["output_ids"] == ch.token_ids and got["text"] == ch.text
    assert meta["finish_reason"] == {"type": "length", "length": 8} and meta["prompt_tokens"] == len(prompt)
    assert [t for _, t, _ in meta["output_token_logprobs"]] == ch.token_ids
    np.testing.assert_allclose([lp for lp, _, _ in meta["output_token_logprobs"]], ch.logprobs.token_logprobs,
                               atol=1e-5)
    routing = from_sglang(meta["routed_experts"], MOE_LAYER_IDS, NUM_LAYERS, TOP_K)
    np.testing.assert_array_equal(routing, decode(ch.routed_experts))
    # as slime reads it (slime/utils/types.py Sample._apply_meta_info): int32, a slot per layer, dense zeros
    raw = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype="<i4")
    full = raw.reshape(len(prompt) + 8 - 1, NUM_LAYERS, TOP_K)
    assert not full[:, [0, 2]].any() and (full[:, MOE_LAYER_IDS] == routing).all()
    compact = srv.post("/generate", {**body, "rid": "gen-c", "routed_experts_compact": True}).json()["meta_info"]
    np.testing.assert_array_equal(decode(compact["routed_experts"]), routing)
    np.testing.assert_array_equal(LocalStore(srv.store_dir).get("gen-a"), routing)
    later = srv.post("/generate", {**body, "rid": "gen-b", "routed_experts_start_len": 3}).json()["meta_info"]
    np.testing.assert_array_equal(from_sglang(later["routed_experts"], MOE_LAYER_IDS, NUM_LAYERS, TOP_K), routing[3:])

    text = srv.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                                     "ignore_eos": True}}).json()["text"]
    stop = text[3:5]
    stopped = srv.post("/generate", {"text": "Hello", "sampling_params": {
        "max_new_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [stop]}}).json()
    assert stopped["text"] == text[: text.find(stop)] and stopped["meta_info"]["finish_reason"] == {
        "type": "stop", "matched": stop}
    long_prompt = {"input_ids": list(range(20, 60)), "sampling_params": {"max_new_tokens": 1}}
    srv.post("/generate", long_prompt)
    assert srv.post("/generate", long_prompt).json()["meta_info"]["cached_tokens"] >= 32  # 4 full blocks of 8
    assert httpx.get(srv.url + "/flush_cache").json() == {"success": True}
    assert srv.post("/generate", long_prompt).json()["meta_info"]["cached_tokens"] == 0
    greedy = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    singles = [srv.post("/generate", {"input_ids": p, "sampling_params": greedy}).json()["output_ids"]
               for p in (prompt, [7, 8, 9])]
    before = srv.metrics()["routereplay_requests_total"]
    batch = srv.post("/generate", {"input_ids": [prompt, [7, 8, 9]], "rid": ["gen-b0", "gen-b1"],
                                   "return_routed_experts": True, "sampling_params": {**greedy, "n": 2}}).json()
    assert [x["output_ids"] for x in batch] == [singles[0], singles[0], singles[1], singles[1]]
    assert [x["meta_info"]["routing_key"] for x in batch] == ["gen-b0/0", "gen-b0/1", "gen-b1/0", "gen-b1/1"]
    np.testing.assert_array_equal(LocalStore(srv.store_dir).get("gen-b1/0"), from_sglang(
        batch[2]["meta_info"]["routed_experts"], MOE_LAYER_IDS, NUM_LAYERS, TOP_K))
    for bad, param in [({"input_ids": [prompt, [5, VOCAB + 1]]}, "input_ids"),
                       ({"input_ids": [prompt, [5]], "rid": ["only-one"]}, "rid"),
                       ({"input_ids": prompt, "rid": ["a"]}, "rid")]:
        r = srv.post("/generate", {**bad, "sampling_params": greedy})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "input_ids[1]" in srv.post("/generate", {"input_ids": [prompt, [5, VOCAB + 1]]}).json()["error"]["message"]
    assert srv.metrics()["routereplay_requests_total"] - before == 2  # the batch's two prompts; no bad one queued
    pen = {"repetition_penalty": 1.7, "presence_penalty": 0.6, "frequency_penalty": 0.9}
    penalised = srv.post("/generate", {"input_ids": prompt, "sampling_params": {**greedy, **pen}}).json()
    same = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                           presence_penalty=0.6, frequency_penalty=0.9,
                                           extra_body={"ignore_eos": True, "repetition_penalty": 1.7})
    assert penalised["output_ids"] == same.choices[0].token_ids != singles[0]
    held = srv.post("/generate", {"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 6, "min_new_tokens": 6, "temperature": 0, "stop_token_ids": [ch.token_ids[0]]}}).json()
    assert len(held["output_ids"]) == 6 and ch.token_ids[0] not in held["output_ids"]
    two = srv.post("/generate", {"input_ids": prompt, "sampling_params": {"n": 2, "max_new_tokens": 3}}).json()
    assert isinstance(two, list) and len(two) == 2 and all(len(x["output_ids"]) <= 3 for x in two)
    slime = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 40, "stop": None, "stop_token_ids": [],
             "skip_special_tokens": False, "no_stop_trim": True, "spaces_between_special_tokens": False,
             "ignore_eos": True, "sampling_seed": 3, "n": 6}  # the sampling_params of slime's rollouts
    got = srv.post("/generate", {"input_ids": prompt, "sampling_params": slime, "return_logprob": True}).json()
    assert isinstance(got, list), got
    assert any(set(x["output_ids"]) & set(tok.all_special_ids) for x in got), "no special token: pick another seed"
    assert [x["text"] for x in got] == [tok.decode(x["output_ids"], skip_special_tokens=False) for x in got]
    again = srv.post("/generate", {"input_ids": prompt, "sampling_params": slime}).json()
    assert [x["output_ids"] for x in again] == [x["output_ids"] for x in got]  # sampling_seed is the seed

    for bad, param in [({"sampling_params": {"frequency_penalty": 5.0}}, "sampling_params.frequency_penalty"),
                       ({"sampling_params": {"min_p": 0.1}}, "sampling_params.min_p"),
                       ({"sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
                       ({"text": "hi"}, "text"), ({"stream": True}, "stream"),
                       ({"routed_experts_start_len": 99}, "routed_experts_start_len"),
                       ({"top_logprobs_num": 2}, "top_logprobs_num"),  # without return_logprob
                       ({"image_data": "x"}, "image_data")]:
        r = srv.post("/generate", {"input_ids": prompt, **bad})
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, (bad, r.text)


def test_top_logprobs_in_every_api_form(srv: Server, tok) -> None:
    """OpenAI completions (logprobs=N), chat (top_logprobs=N), streamed and not, and SGLang's top_logprobs_num:
    the same N tokens per position, most likely first, the sampled (greedy) token on top."""
    c = srv.client()
    kw = dict(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, logprobs=3,
              extra_body={"ignore_eos": True})
    ch = c.completions.create(**kw).choices[0]
    tops = ch.logprobs.top_logprobs
    assert len(tops) == 6
    for s, lp, top in zip(ch.logprobs.tokens, ch.logprobs.token_logprobs, tops, strict=True):
        # fewer than 3 keys when two tokens decode to one string (OpenAI's form is keyed by text)
        assert 1 <= len(top) <= 3 and max(top, key=top.get) == s and top[s] == pytest.approx(lp, abs=1e-5)
    streamed = sum((k.choices[0].logprobs.top_logprobs for k in c.completions.create(**kw, stream=True)
                    if k.choices[0].logprobs), [])
    assert [list(t) for t in streamed] == [list(t) for t in tops]
    np.testing.assert_allclose([list(t.values()) for t in streamed], [list(t.values()) for t in tops], atol=1e-5)

    msgs = [{"role": "user", "content": "hi"}]
    chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                     top_logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    for entry in chat.logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob

    meta = srv.post("/generate", {"input_ids": [5, 6, 7, 8], "return_logprob": True, "top_logprobs_num": 3,
                                  "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
                    ).json()["meta_info"]
    gen_tops = meta["output_top_logprobs"]
    assert all(len(top) == 3 and len({t for _, t, _ in top}) == 3 for top in gen_tops)
    assert [{tok.decode([t]): lp for lp, t, _ in top} for top in gen_tops] == [
        pytest.approx(top, abs=1e-5) for top in tops]


def test_chat_stream_equals_nonstream(srv: Server, tok) -> None:
    c = srv.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=0, logprobs=True)
    extra = {"ignore_eos": True, "return_routed_experts": True}
    r = c.chat.completions.create(**kw, extra_body=extra)
    ch = r.choices[0]
    expect_prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ch.prompt_token_ids == tok(expect_prompt)["input_ids"]
    assert len(ch.token_ids) == 10 and ch.message.content == tok.decode(ch.token_ids, skip_special_tokens=True)
    assert len(ch.logprobs.content) == 10
    routing = decode(ch.routed_experts)
    check_routing(routing, len(ch.prompt_token_ids) + 10)
    assert ch.routing_key == r.id  # no rollout_id and no user: the response id is the key
    np.testing.assert_array_equal(LocalStore(srv.store_dir).get(r.id), routing)

    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                            extra_body=extra))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    parts = [k.choices[0] for k in chunks[:-1]]
    assert parts[0].delta.role == "assistant"
    assert "".join(p.delta.content or "" for p in parts) == ch.message.content
    assert sum((p.token_ids for p in parts[1:]), []) == ch.token_ids
    assert parts[-1].finish_reason == "length"
    np.testing.assert_array_equal(decode(parts[-1].routed_experts), routing)


def test_batched_prompts_with_n_samples(srv: Server) -> None:
    r = srv.client().completions.create(
        model=MODEL, prompt=[[5, 6, 7], [8, 9, 10, 11]], n=2, max_tokens=4, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True, "rollout_id": "bat"})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.usage.prompt_tokens == 7
    store = LocalStore(srv.store_dir)
    for ch in r.choices:
        j, i = divmod(ch.index, 2)
        assert ch.routing_key == f"bat/{j}/{i}" and ch.prompt_token_ids == [[5, 6, 7], [8, 9, 10, 11]][j]
        assert getattr(ch, "routed_experts", None) is None  # the server default: store only
        check_routing(store.get(ch.routing_key), len(ch.prompt_token_ids) + 4)


def test_abandoned_stream_is_aborted(srv: Server) -> None:
    before = srv.metrics()["routereplay_generation_tokens_total"]
    stream = srv.client().completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=MAX_MODEL_LEN - 4,
                                             stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    stream.close()  # the client goes away after two tokens
    deadline = time.monotonic() + 10
    while srv.metrics()["routereplay_queue_depth"] > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    m = srv.metrics()
    assert m["routereplay_queue_depth"] == 0
    assert m["routereplay_generation_tokens_total"] - before < MAX_MODEL_LEN - 4  # stopped early


# ---- load and persistence --------------------------------------------------------------------------
def test_64_concurrent_requests_match_store_and_survive_restart(srv: Server) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 40))] for _ in range(64)]
    c = srv.client()
    before = srv.metrics()["routereplay_requests_total"]

    store = LocalStore(srv.store_dir)

    def one(i: int):
        r = c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=4 + i % 9, temperature=1.0,
                                 seed=i, extra_body={"ignore_eos": True, "return_routed_experts": True,
                                                     "rollout_id": f"c64-{i}"})
        return r, store.get(f"c64-{i}")  # read at once: the response waited for the write

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert srv.metrics()["routereplay_requests_total"] - before == 64
    for i, (r, stored) in enumerate(results):
        ch = r.choices[0]
        assert ch.routing_key == f"c64-{i}" and ch.routing_error is None and len(ch.token_ids) == 4 + i % 9
        got = decode(ch.routed_experts)
        check_routing(got, len(prompts[i]) + len(ch.token_ids))
        np.testing.assert_array_equal(stored, got)
        np.testing.assert_array_equal(store.get(ch.routing_key), got)
    assert store.keys("c64-") == sorted(f"c64-{i}" for i in range(64))
    held = {k: store.get(k) for k in store.keys()}

    srv.restart()
    store = LocalStore(srv.store_dir)
    assert store.keys() == sorted(held)
    for k, v in held.items():
        np.testing.assert_array_equal(store.get(k), v)
    ch = complete(srv.client(), rollout_id="after-restart").choices[0]
    np.testing.assert_array_equal(store.get("after-restart"), decode(ch.routed_experts))
    assert len(store.keys()) == len(held) + 1


# ---- Redis, and a Redis outage ---------------------------------------------------------------------
def test_redis_store_and_outage(ckpt: str, redis_server_factory, tmp_path: Path) -> None:
    redis_server = redis_server_factory()
    rr = {"enable": True, "store": "redis", "redis_url": redis_server.url}
    server = Server(ckpt, tmp_path / "server.log", "--routing-replay", json.dumps(rr))
    try:
        c = server.client()
        with RedisStore(redis_server.url) as rs:
            for i in range(3):
                ch = complete(c, rollout_id=f"up{i}").choices[0]
                assert ch.routing_error is None
                np.testing.assert_array_equal(rs.get(f"up{i}"), decode(ch.routed_experts))
        assert server.metrics()["routereplay_store_errors_total"] == 0

        redis_server.stop()  # mid-run outage: generation goes on, the routing write fails visibly
        for i in range(3):
            ch = complete(c, rollout_id=f"down{i}").choices[0]
            assert len(ch.token_ids) == 4 and ch.routing_key == f"down{i}"
            assert "ConnectionError" in ch.routing_error
        final = list(c.completions.create(model=MODEL, prompt=[5, 6], max_tokens=3, stream=True,
                                          extra_body={"rollout_id": "down-stream"}))[-1].choices[0]
        assert final.finish_reason and "ConnectionError" in final.routing_error
        assert server.metrics()["routereplay_store_errors_total"] >= 4
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop_gracefully()
    log = server.log()
    assert "routing store write failed for key 'down0'" in log and "ConnectionError" in log


# ---- bad input -------------------------------------------------------------------------------------
CMP, CHAT = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True}
BAD = [
    ("malformed-json", CMP, b'{"model": "tiny-moe", "prompt": ', 400, "body"),
    ("not-an-object", CMP, [1, 2], 400, "body"),
    ("max_tokens-type", CMP, {**GOOD, "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature-type", CMP, {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("prompt-type", CMP, {**GOOD, "prompt": 5}, 400, "prompt"),
    ("messages-type", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("content-type", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("unknown-model", CMP, {**GOOD, "model": "no-such-model"}, 404, "model"),
    ("prompt-too-long", CMP, {**GOOD, "prompt": [5] * (MAX_MODEL_LEN + 10)}, 400, "prompt"),
    ("chat-too-long", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]},
     400, "messages"),
    ("max_tokens-0", CMP, {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("routed_experts_start", CMP, {**GOOD, "routed_experts_start": 50}, 400, "routed_experts_start"),
    ("token-out-of-vocab", CMP, {**GOOD, "prompt": [5, VOCAB + 1]}, 400, "prompt"),
    ("empty-batch-item", CMP, {**GOOD, "prompt": [[5, 6], []]}, 400, "prompt"),
    ("n-0", CMP, {**GOOD, "n": 0}, 400, "n"),
    ("top_p", CMP, {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("stop_token_ids", CMP, {**GOOD, "stop_token_ids": [VOCAB + 5]}, 400, "stop_token_ids"),
    ("empty-rollout_id", CMP, {**GOOD, "rollout_id": ""}, 400, "rollout_id"),
    ("stop-empty-string", CMP, {**GOOD, "stop": ["ok", ""]}, 400, "stop"),
    ("stop-not-strings", CMP, {**GOOD, "stop": [1]}, 400, "stop"),
    ("echo-on-chat", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "echo": True}, 400,
     "echo"),
    ("logprobs-21", CMP, {**GOOD, "logprobs": 21}, 400, "logprobs"),
    ("min_tokens-above-max", CMP, {**GOOD, "min_tokens": 5}, 400, "min_tokens"),
    ("top_logprobs-without-logprobs", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                             "top_logprobs": 2}, 400, "top_logprobs"),
    ("presence_penalty", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("repetition_penalty", CMP, {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
]


def test_bad_input_is_rejected_by_field_and_server_keeps_serving(srv: Server) -> None:
    before = srv.metrics()["routereplay_requests_total"]
    for name, path, body, status, param in BAD:
        if isinstance(body, bytes):
            r = srv.post(path, content=body)
        else:
            r = srv.post(path, body)
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", (name, err)
        if name == "unknown-model":
            assert "no-such-model" in err["message"]
        ok = srv.post(CMP, GOOD)
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 2, (name, ok.text)
    # Nothing was queued for a bad request: only the good ones reached the engine.
    assert srv.metrics()["routereplay_requests_total"] - before == len(BAD)
    with pytest.raises(NotFoundError) as e:
        srv.client().completions.create(model="other", prompt="hi")
    assert e.value.param == "model"


def test_routing_asked_while_capture_is_off(servers: dict) -> None:
    c = servers["plain"].client()
    with pytest.raises(BadRequestError) as e:
        complete(c)  # asks for return_routed_experts
    assert e.value.param == "return_routed_experts" and "disabled" in e.value.message
    ch = c.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True}).choices[0]
    assert len(ch.token_ids) == 3
    assert getattr(ch, "routed_experts", None) is None and getattr(ch, "routing_key", None) is None


# ---- store keys from clients -------------------------------------------------------------------------
EVIL_KEYS = ["..", ".", "../escape", "../../etc/rr_escape", "/tmp/rr_abs_escape", "a/../../b", "./.hidden",
             "..\\..\\win", "%2e%2e%2fx", "~", "../" * 80 + "deep", "ü/../ß", " ", "x/" * 10]


def test_store_keys_cannot_escape_the_store_dir(srv: Server) -> None:
    c = srv.client()
    for key in EVIL_KEYS:
        ch = complete(c, rollout_id=key).choices[0]
        assert ch.routing_key == key and ch.routing_error is None, key
        np.testing.assert_array_equal(LocalStore(srv.store_dir).get(key), decode(ch.routed_experts))
    for field, value in [("rollout_id", "a\x00b"), ("rollout_id", "\ud800")]:
        r = srv.post(CMP, content=json.dumps({**GOOD, field: value}).encode())
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    assert len(complete(c, rollout_id="fine").choices[0].token_ids) == 4  # the engine was not wedged
    root = os.path.realpath(srv.store_dir)
    for dirpath, _dirs, files in os.walk(srv.base):
        for f in files:
            real = os.path.realpath(os.path.join(dirpath, f))
            assert real.startswith(root + os.sep) or real == os.path.realpath(srv.log_path), real
    assert not os.path.exists("/tmp/rr_abs_escape.npy") and not os.path.exists("/etc/rr_escape.npy")
    assert sorted(os.listdir(srv.base)) == ["server.log", "store"]
