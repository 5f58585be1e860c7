"""The rollout server under an adversarial client (issue 15): bounds by field, one request never hurts another,
store keys that never collide, clients that leave, a deployment locked down. A real uvicorn subprocess,
the official openai client, raw httpx and raw sockets."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import AuthenticationError, OpenAI

from routereplay import LLM, SamplingParams
from routereplay.routing import decode
from routereplay.store import LocalStore
from tests.test_server import MAX_MODEL_LEN, MODEL, VOCAB, Server, _wait_until_queued, check_routing

CMP, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
GOOD = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True}
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def hard(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """Routing stored in a local dir, a short body timeout, a small body limit."""
    base = tmp_path_factory.mktemp("hard")
    rr = {"enable": True, "store": "local", "local_store_dir": str(base / "store")}
    srv = Server(ckpt, base / "server.log", "--routing-replay", json.dumps(rr), "--max-num-seqs", "16",
                 "--request-body-timeout", str(BODY_TIMEOUT_S), "--max-request-bytes", str(16 << 20))
    srv.store_dir = base / "store"
    yield srv
    srv.stop_gracefully()


def _no_nan(text: str) -> None:
    assert "NaN" not in text and "Infinity" not in text, text[:500]


def _stream_while(srv: Server, action) -> tuple[object, list[float]]:
    """Run ``action()`` while a long stream is being read; returns its result and the gaps between the
    stream's chunks during the action (a blocked event loop shows up as a long gap)."""
    started, done = threading.Event(), threading.Event()
    stamps: list[float] = []

    def reader() -> None:
        with httpx.stream("POST", srv.url + CMP, json={**GOOD, "max_tokens": MAX_MODEL_LEN - 4, "stream": True,
                                                        "temperature": 0}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    stamps.append(time.monotonic())
                    started.set()
                if done.is_set():
                    return

    t = threading.Thread(target=reader)
    srv.post("/pause_generation", {"mode": "in_place"})  # the stream must still run while the action does
    t.start()
    _wait_until_queued(srv, 1)
    srv.post("/continue_generation")
    assert started.wait(30)
    t0 = time.monotonic()
    result = action()
    t1 = time.monotonic()
    done.set()
    t.join(60)
    during = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > t0 and a < t1]
    return result, during


# ---- bounds --------------------------------------------------------------------------------------------
BAD = [  # (name, path, body, param); each must be a 400 naming param
    ("n-huge", CMP, {**GOOD, "n": 10**6}, "n"),
    ("n-beyond-int64", CMP, {**GOOD, "n": 10**30}, "n"),
    ("n-bool", CMP, {**GOOD, "n": True}, "n"),
    ("n-above-max-num-seqs", CMP, {**GOOD, "n": 17}, "n"),
    ("top_k-2^63", CMP, {**GOOD, "top_k": 2**63}, "top_k"),
    ("top_k-above-vocab", CMP, {**GOOD, "top_k": VOCAB + 1}, "top_k"),
    ("top_p-rounds-to-0", CMP, {**GOOD, "top_p": 1e-300}, "top_p"),
    ("repetition_penalty-rounds-to-0", CMP, {**GOOD, "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("temperature-overflows-float32", CMP, {**GOOD, "temperature": 1e300}, "temperature"),
    ("seed-2^64", CMP, {**GOOD, "seed": 2**64}, "seed"),
    ("max_tokens-2^63", CMP, {**GOOD, "max_tokens": 2**63}, "max_tokens"),
    ("max_tokens-beyond-context", CMP, {**GOOD, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("min_tokens-masks-everything", CMP, {**GOOD, "min_tokens": 2, "max_tokens": 4,
                                          "stop_token_ids": list(range(VOCAB))}, "min_tokens"),
    ("ignore_eos-string", CMP, {**GOOD, "ignore_eos": "false"}, "ignore_eos"),
    ("prompt-surrogate", CMP, {**GOOD, "prompt": "a\ud800b"}, "prompt"),
    ("prompt-batch-too-long", CMP, {**GOOD, "prompt": [[1]] * 1025}, "prompt"),
    ("prompt-text-too-long", CMP, {**GOOD, "prompt": "x" * (32 * MAX_MODEL_LEN + 1)}, "prompt"),
    ("chat-max_completion_tokens", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "max_completion_tokens": -1}, "max_completion_tokens"),
    ("gen-text-empty-batch", GEN, {"text": []}, "text"),
    ("gen-text-surrogate", GEN, {"text": "\udfff"}, "text"),
    ("gen-max_new_tokens-string", GEN, {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": "5"}},
     "sampling_params.max_new_tokens"),
    ("gen-stop_token_ids-int", GEN, {"input_ids": [5, 6], "sampling_params": {"stop_token_ids": 5}},
     "sampling_params.stop_token_ids"),
    ("gen-ignore_eos-string", GEN, {"input_ids": [5, 6], "sampling_params": {"ignore_eos": "false"}},
     "sampling_params.ignore_eos"),
    ("gen-n-bool", GEN, {"input_ids": [5, 6], "sampling_params": {"n": True}}, "sampling_params.n"),
    ("gen-duplicate-rid", GEN, {"input_ids": [[5, 6], [7, 8]], "rid": ["a", "a"]}, "rid[1]"),
    ("gen-rid-derived-suffix", GEN, {"input_ids": [5, 6], "rid": "R/1"}, "rid"),
    ("rollout_id-derived-suffix", CMP, {**GOOD, "rollout_id": "R/0"}, "rollout_id"),
    ("master_port", "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 99999,
                                                   "rank_offset": 1, "world_size": 2}, "master_port"),
]


def test_bad_fields_get_a_400_naming_them_and_nothing_is_queued(hard: Server) -> None:
    before = hard.metrics()["routereplay_requests_total"]
    for name, path, body, param in BAD:
        r = hard.post(path, content=json.dumps(body).encode())  # json.dumps keeps lone surrogates escaped
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
        _no_nan(r.text)
        assert r.json()["error"]["param"] == param, (name, r.json())
    assert hard.metrics()["routereplay_requests_total"] == before  # nothing reached the engine
    assert hard.post(CMP, GOOD).status_code == 200


def test_huge_n_and_a_10mb_batch_are_refused_within_a_second_while_a_stream_runs(hard: Server) -> None:
    big = json.dumps({**GOOD, "prompt": [[7]] * 2_000_000}).encode()
    assert len(big) > 10_000_000

    def refuse() -> list[tuple[int, float]]:
        got = []
        for content in (json.dumps({**GOOD, "n": 10**6}).encode(), big):
            t0 = time.monotonic()
            r = hard.post(CMP, content=content)
            got.append((r.status_code, time.monotonic() - t0, r.json()["error"]["param"]))
        return got

    got, gaps = _stream_while(hard, refuse)
    assert [(s, p) for s, _, p in got] == [(400, "n"), (400, "prompt")]
    assert max(t for _, t, _ in got) < 1.0, got
    assert gaps and max(gaps) < 1.0, gaps  # the stream kept flowing


def test_a_10mb_text_prompt_is_refused_before_tokenizing(hard: Server) -> None:
    body = json.dumps({**GOOD, "prompt": "hello " * 1_750_000}).encode()

    def refuse():
        t0 = time.monotonic()
        r = hard.post(CMP, content=body)
        return r, time.monotonic() - t0

    (r, took), gaps = _stream_while(hard, refuse)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and took < 1.0, (r.text, took)
    assert gaps and max(gaps) < 1.0, gaps


def test_tiny_temperature_is_greedy_and_no_nan_reaches_json(hard: Server) -> None:
    """vLLM treats temperature < 1e-5 as greedy; 1e-45 divided the logits into inf and NaN before."""
    c = hard.client()
    kw = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=6, logprobs=2, extra_body={"ignore_eos": True})
    greedy = c.completions.create(temperature=0, **kw).choices[0]
    for t in (1e-45, 1e-6):
        tiny = c.completions.create(temperature=t, **kw).choices[0]
        assert tiny.token_ids == greedy.token_ids
        assert all(math.isfinite(x) for x in tiny.logprobs.token_logprobs)
    r = hard.post(CMP, {**GOOD, "temperature": 1e-45, "logprobs": 5, "max_tokens": 4, "stream": True})
    _no_nan(r.text)
    assert r.text.rstrip().endswith("data: [DONE]")


def test_a_bad_request_in_a_busy_batch_fails_alone(hard: Server) -> None:
    """Innocent requests running in the same engine steps complete while bad ones are refused."""
    c = hard.client()

    def innocent(i: int) -> list[int]:
        return c.completions.create(model=MODEL, prompt=[5, 6, 7 + i], max_tokens=24, temperature=1.0, seed=i,
                                    extra_body={"ignore_eos": True}).choices[0].token_ids

    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(innocent, i) for i in range(6)]
        bad = [pool.submit(hard.post, CMP, {**GOOD, "top_k": 2**63}),
               pool.submit(hard.post, CMP, {**GOOD, "top_p": 1e-300})]
        assert [len(f.result(60)) for f in good] == [24] * 6
        assert [f.result(60).status_code for f in bad] == [400, 400]
    assert httpx.get(hard.url + "/health").status_code == 200


# ---- keys ----------------------------------------------------------------------------------------------
def test_routing_keys_never_collide(hard: Server, ckpt: str, tmp_path: Path) -> None:
    """Every pair of {rollout_id R with n=2, rollout_id R/0, a batch of 2 under R, rid R/1, user only, offline
    generate with one rollout id for 2 prompts}: each routing is in the store under its own key (checked
    against the inline routing), or the request that would collide is refused."""
    c, store = hard.client(), LocalStore(hard.store_dir)
    R = "kc"
    kept: dict[str, np.ndarray] = {}

    def keep(choices) -> None:
        for ch in choices:
            assert ch.routing_key not in kept, ch.routing_key
            kept[ch.routing_key] = decode(ch.routed_experts)

    kw = dict(model=MODEL, max_tokens=3, temperature=1.0)
    extra = {"ignore_eos": True, "return_routed_experts": True}
    keep(c.completions.create(prompt=[5, 6, 7], n=2, **kw, extra_body={**extra, "rollout_id": R}).choices)
    assert hard.post(CMP, {**GOOD, "rollout_id": f"{R}/0"}).status_code == 400
    keep(c.completions.create(prompt=[[5, 6], [7, 8, 9]], **kw, extra_body={**extra, "rollout_id": R}).choices)
    assert hard.post(GEN, {"input_ids": [5, 6], "rid": f"{R}/1"}).status_code == 400
    for _ in range(2):  # the same user twice: two keys
        keep(c.completions.create(prompt=[5, 6], user=R, **kw, extra_body=extra).choices)
    gen = hard.post(GEN, {"input_ids": [[5, 6, 7], [8, 9]], "rid": [f"{R}-g0", f"{R}-g1"],
                          "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}).json()
    assert [x["meta_info"]["routing_key"] for x in gen] == [f"{R}-g0", f"{R}-g1"]
    for x, n in zip(gen, (3, 2), strict=True):
        assert x["meta_info"]["routing_error"] is None
        check_routing(store.get(x["meta_info"]["routing_key"]), n + 3)
    # Offline, one rollout id for two prompts: keyed per prompt as the server keys a batch. (Under R itself it
    # would be R's batch again: the same rollout id and shape, a later turn that overwrites by design.)
    llm = LLM(ckpt, max_model_len=MAX_MODEL_LEN, block_size=8,
              routing_replay={"enable": True, "store": "local", "local_store_dir": str(hard.store_dir)})
    try:
        outs = llm.generate(prompt_token_ids=[[5, 6], [9, 10, 11]], use_tqdm=False,
                            sampling_params=SamplingParams(max_tokens=3, rollout_id=f"{R}-offline", ignore_eos=True,
                                                           return_routed_experts=True))
    finally:
        llm.close()
    for o in outs:
        for ch in o.outputs:
            assert ch.routing_key not in kept, ch.routing_key
            kept[ch.routing_key] = ch.routed_experts
    assert len(kept) == 2 + 2 + 2 + 2
    for key, routing in kept.items():
        np.testing.assert_array_equal(store.get(key), routing, err_msg=key)
    assert sorted(k for k in kept if k.startswith(R + "/")) == [f"{R}/0", f"{R}/0/0", f"{R}/1", f"{R}/1/0"]
    assert sorted(k for k in kept if k.startswith(R + "-offline")) == [f"{R}-offline/0/0", f"{R}-offline/1/0"]


def test_one_rollout_id_in_flight_twice_is_refused(hard: Server) -> None:
    hard.post("/pause_generation", {"mode": "in_place"})
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(hard.post, CMP, {**GOOD, "rollout_id": "twice"})
            _wait_until_queued(hard, 1)
            second = hard.post(CMP, {**GOOD, "rollout_id": "twice"})
            assert second.status_code == 400 and second.json()["error"]["param"] == "rollout_id", second.text
            assert "in flight" in second.json()["error"]["message"]
            hard.post("/continue_generation")
            assert first.result(60).status_code == 200
    finally:
        hard.post("/continue_generation")
    # a later turn of the same rollout (the earlier one ended) overwrites by design
    assert hard.post(CMP, {**GOOD, "rollout_id": "twice"}).status_code == 200


def test_abort_request_takes_the_rollout_id_of_a_batch(hard: Server) -> None:
    hard.post("/pause_generation", {"mode": "in_place"})
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(hard.post, CMP, {**GOOD, "prompt": [[5, 6], [7, 8], [9, 10]],
                                                   "rollout_id": "ab-batch"})
            _wait_until_queued(hard, 3)
            assert hard.post("/abort_request", {"rid": "ab-batch"}).json() == {"success": True, "aborted": 3}
            got = pending.result(60).json()
    finally:
        hard.post("/continue_generation")
    assert [ch["finish_reason"] for ch in got["choices"]] == ["abort"] * 3


# ---- clients that leave, clients that stall -----------------------------------------------------------
def test_a_disconnected_non_streaming_request_is_aborted_and_frees_its_kv(hard: Server) -> None:
    total = hard.metrics()["routereplay_free_kv_blocks"]
    hard.post("/pause_generation", {"mode": "in_place"})
    try:
        sock = socket.create_connection(("127.0.0.1", int(hard.url.rsplit(":", 1)[1])))
        body = json.dumps({**GOOD, "prompt": list(range(3, 100)), "max_tokens": 100}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait_until_queued(hard, 1)
        gen_before = hard.metrics()["routereplay_generation_tokens_total"]
        sock.close()  # the client goes away while the request waits: no step has run for it
        deadline = time.monotonic() + 10
        while hard.metrics()["routereplay_queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.02)
        m = hard.metrics()
        assert m["routereplay_queue_depth"] == 0 and m["routereplay_free_kv_blocks"] == total
    finally:
        hard.post("/continue_generation")
    assert hard.metrics()["routereplay_generation_tokens_total"] == gen_before  # nothing generated for nobody


def test_a_client_that_stalls_mid_body_gets_408(hard: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", int(hard.url.rsplit(":", 1)[1])))
    sock.settimeout(10)
    t0 = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    reply = sock.recv(4096).decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < BODY_TIMEOUT_S + 2, reply


def test_a_body_over_the_limit_gets_413(hard: Server) -> None:
    r = hard.post(CMP, content=b" " * ((16 << 20) + 1))
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"


# ---- lock-down -----------------------------------------------------------------------------------------
def test_api_key_weight_dirs_and_a_fast_shutdown(ckpt: str, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    step = allowed / "step1"
    shutil.copytree(ckpt, step)
    os.symlink(ckpt, allowed / "link-out")  # inside the allow-list by its name, outside by its target
    srv = Server(ckpt, tmp_path / "server.log", "--api-key", "sesame", "--weight-dir", str(allowed),
                 "--shutdown-timeout", "2")
    try:
        assert httpx.get(srv.url + "/health").status_code == 200  # the one open endpoint
        endpoints = [("GET", "/v1/models", None), ("POST", CMP, GOOD), ("POST", CHAT, {"model": MODEL}),
                     ("POST", GEN, {"input_ids": [5]}), ("GET", "/health_generate", None), ("GET", "/metrics", None),
                     ("POST", "/flush_cache", None), ("POST", "/abort_request", {"abort_all": True}),
                     ("POST", "/pause_generation", {}), ("POST", "/continue_generation", None),
                     ("POST", "/update_weights_from_disk", {"model_path": str(step)}),
                     ("POST", "/init_weights_update_group", {}), ("POST", "/update_weights_from_distributed", {}),
                     ("POST", "/destroy_weights_update_group", {})]
        for method, path, body in endpoints:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                r = httpx.request(method, srv.url + path, json=body, headers=headers, timeout=30)
                assert r.status_code == 401, (path, headers, r.text)
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = OpenAI(base_url=srv.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == [MODEL]
        assert len(c.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2).choices[0].text) >= 0
        auth = {"Authorization": "Bearer sesame"}
        ok = httpx.post(srv.url + "/update_weights_from_disk", json={"model_path": str(step)}, headers=auth, timeout=60)
        assert ok.status_code == 200, ok.text
        answers = set()
        for outside in (ckpt, "/etc", "/no/such/dir", str(allowed / ".." / "x"), str(allowed / "link-out"),
                        str(allowed / "missing")):
            r = httpx.post(srv.url + "/update_weights_from_disk", json={"model_path": outside}, headers=auth,
                           timeout=30)
            assert r.status_code == 400, r.text
            if not outside.startswith(str(allowed / "missing")):
                answers.add(r.json()["error"]["message"])
        assert len(answers) == 1 and "/etc" not in answers.pop()  # one answer: nothing about what exists

        # shutdown with a long rollout streaming and another waiting: done within a few seconds
        stream = httpx.stream("POST", srv.url + CMP, headers=auth, timeout=60,
                              json={**GOOD, "max_tokens": MAX_MODEL_LEN - 4, "stream": True})
        stream.__enter__()
        t0 = time.monotonic()
        rc = srv.stop()
        took = time.monotonic() - t0
        stream.__exit__(None, None, None)
        assert took < 8, took
        assert "engine closed" in srv.log()
        assert rc in (0, -15), srv.log()[-2000:]
    finally:
        srv.stop()


# every field at its type's limits: no answer is a 5xx, none carries NaN, a 4xx names a field of the body
LIMIT_VALUES = [2**63, -(2**63) - 1, 10**30, 1e-45, 1e300, -1, 0, "x", "\ud800", True, None, [], {}, [1, "a"],
                float("nan"), float("inf")]
CMP_FIELDS = ["n", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
              "include_stop_str_in_output", "skip_special_tokens", "min_tokens", "presence_penalty",
              "frequency_penalty", "repetition_penalty", "logprobs", "echo", "stream", "stream_options",
              "return_routed_experts", "routed_experts_start", "rollout_id", "store_routing", "user", "prompt",
              "model", "suffix", "best_of", "logit_bias"]
GEN_FIELDS = ["text", "input_ids", "rid", "return_logprob", "top_logprobs_num", "return_routed_experts",
              "routed_experts_start_len", "routed_experts_compact", "stream", "log_metrics", "lora_path",
              "sampling_params"]
GEN_SAMPLING = ["max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "ignore_eos",
                "no_stop_trim", "skip_special_tokens", "sampling_seed", "min_new_tokens", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "min_p", "custom_params"]


def test_every_field_at_its_limits_gets_no_5xx(hard: Server) -> None:
    cases = [(CMP, {**GOOD, f: v}) for f in CMP_FIELDS for v in LIMIT_VALUES]
    gen = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
    cases += [(GEN, {**gen, f: v}) for f in GEN_FIELDS for v in LIMIT_VALUES]
    cases += [(GEN, {**gen, "sampling_params": {"max_new_tokens": 2, k: v}}) for k in GEN_SAMPLING
              for v in LIMIT_VALUES]
    cases += [(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, f: v})
              for f in ("messages", "max_completion_tokens", "top_logprobs", "logprobs", "n") for v in LIMIT_VALUES]
    bad = []
    # sent 16 at a time through one pooled client (the engine batches the ones it accepts): ~1,000 cases
    with httpx.Client(base_url=hard.url, timeout=60, headers={"content-type": "application/json"},
                      limits=httpx.Limits(max_connections=16)) as client, ThreadPoolExecutor(16) as pool:
        # NaN / inf go out as the JSON literals clients such as Python's json send
        answers = pool.map(lambda case: client.post(case[0], content=json.dumps(case[1]).encode()), cases)
        for (path, body), r in zip(cases, answers, strict=True):
            if r.status_code >= 500 or "NaN" in r.text or "Infinity" in r.text:
                bad.append((path, body, r.status_code, r.text[:200]))
            elif r.status_code >= 400:
                param = r.json()["error"]["param"] or ""
                top = param.split(".")[0].split("[")[0]
                if top not in body and top != "body":
                    bad.append((path, body, r.status_code, f"param {param!r} is not a field of the body"))
    assert not bad, bad[:10]
    assert hard.post(CMP, GOOD).status_code == 200
