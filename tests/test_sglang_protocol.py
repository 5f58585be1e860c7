"""The server as a drop-in for SGLang's HTTP API: the exact bodies slime and sglang-router send, discovery,
weight versions, and OpenAI's echo as lm-eval's log-likelihood tasks send it. A real uvicorn server."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from routereplay.store import LocalStore
from tests.test_server import MAX_MODEL_LEN, MODEL, MOE_LAYER_IDS, NUM_LAYERS, TOP_K, Server, check_routing

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def srv(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> Server:
    base = tmp_path_factory.mktemp("sglang")
    rr = {"enable": True, "store": "local", "local_store_dir": str(base / "store")}
    server = Server(ckpt, base / "server.log", "--routing-replay", json.dumps(rr))
    server.store_dir = base / "store"
    yield server
    server.stop_gracefully()


def slime_sampling_params(max_new_tokens: int = 8, top_p: float = 1.0) -> dict:
    """slime/rollout/sglang_rollout.py GenerateState.__init__: the sampling_params of every rollout (unset
    stop / stop_token_ids go as null), custom_params when rollout_top_p != 1."""
    params = {"temperature": 0.0, "top_p": top_p, "top_k": -1, "max_new_tokens": max_new_tokens, "stop": None,
              "stop_token_ids": None, "skip_special_tokens": True, "no_stop_trim": True,
              "spaces_between_special_tokens": False}
    if top_p != 1.0:
        params["custom_params"] = {"return_top_p_token_ids": True}
    return params


def slime_decode_routing(meta: dict, tokens: list[int]) -> np.ndarray:
    """slime/utils/misc.py decode_int32_meta_array + slime/utils/types.py Sample._apply_meta_info: int32,
    rows = len(tokens) - 1 - routed_experts_start_len, reshaped with ALL layers (args.num_layers)."""
    flat = torch.frombuffer(bytearray(base64.b64decode(meta["routed_experts"])), dtype=torch.int32)
    rows = len(tokens) - 1 - meta.get("routed_experts_start_len", 0)
    assert flat.numel() == rows * NUM_LAYERS * TOP_K, (flat.numel(), rows)
    return flat.reshape(rows, NUM_LAYERS, TOP_K).numpy()


def test_slime_rollout_request(srv: Server) -> None:
    """slime/rollout/sglang_rollout.py generate: its payload, decoded the way slime decodes the reply."""
    payload = {"sampling_params": slime_sampling_params(), "return_logprob": True, "input_ids": PROMPT,
               "return_routed_experts": True}
    r = srv.post("/generate", payload)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    tokens = PROMPT + out["output_ids"]  # Sample.tokens after append_response_tokens
    assert [t for _, t, *_ in meta["output_token_logprobs"]] == out["output_ids"]
    assert meta["finish_reason"]["type"] in ("length", "stop") and meta["weight_version"] == "default"
    full = slime_decode_routing(meta, tokens)
    assert not full[:, [i for i in range(NUM_LAYERS) if i not in MOE_LAYER_IDS]].any()  # dense layers zero
    compact = full[:, MOE_LAYER_IDS]
    check_routing(compact.astype(np.uint8), len(tokens))
    np.testing.assert_array_equal(LocalStore(srv.store_dir).get(meta["routing_key"]), compact)
    # top_p != 1 adds custom_params: accepted
    r = srv.post("/generate", {**payload, "sampling_params": slime_sampling_params(top_p=0.9)})
    assert r.status_code == 200, r.text


ROUTER_DEFAULTS = {  # sgl-model-gateway src/protocols/generate.rs GenerateRequest: always serialised
    "model": None, "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
    "return_hidden_states": False, "return_routed_experts": False, "background": False, "no_logs": False,
    "return_bytes": False, "return_entropy": False}
MILES_DEFAULTS = {"routed_experts_start_len": 0, "return_prompt_token_ids": False, "require_reasoning": False}


def test_sglang_router_forwarded_body(srv: Server) -> None:
    """sgl-model-gateway src/routers/http/router.rs route_typed_request: the router re-serialises /generate
    with every field it knows at its default (and the Miles fork's fields); the reply equals the direct one."""
    direct = srv.post("/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0},
                                    "return_logprob": True}).json()
    forwarded = {**ROUTER_DEFAULTS, **MILES_DEFAULTS, "input_ids": PROMPT, "return_logprob": True,
                 "sampling_params": {"max_new_tokens": 6, "temperature": 0}, "data_parallel_rank": 0,
                 "rid": "router-1"}
    r = srv.post("/generate", forwarded)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == direct["output_ids"]
    for field, value in [("return_hidden_states", True), ("image_data", ["x.png"]), ("lora_path", "adapter"),
                         ("logprob_start_len", 0), ("stream", True), ("no_such_field", 1)]:
        r = srv.post("/generate", {**forwarded, "rid": None, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    for key, value in [("json_schema", "{}"), ("min_p", 0.1), ("no_such_key", 1)]:
        body = {**forwarded, "rid": None, "sampling_params": {"max_new_tokens": 2, key: value}}
        r = srv.post("/generate", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == f"sampling_params.{key}", (key, r.text)


def test_discovery_endpoints(srv: Server) -> None:
    """slime/backends/sglang_utils/external.py get_server_info / discover_external_engines, and the router's
    worker registration (GET /server_info then /model_info): the fields they read."""
    import httpx

    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(srv.url + path).json()
        assert info["tp_size"] == 1 and info["pp_size"] == 1 and info["dp_size"] == 1
        assert info["enable_memory_saver"] is False and info["enable_return_routed_experts"] is True
        assert info["disaggregation_mode"] == "null" and info["context_length"] == MAX_MODEL_LEN
        assert isinstance(info["max_total_tokens"], int) and info["served_model_name"] == MODEL
    for path in ("/model_info", "/get_model_info"):
        m = httpx.get(srv.url + path).json()
        assert m["is_generation"] is True and m["model_type"] == "qwen3_moe" and m["architectures"]
    workers = httpx.get(srv.url + "/workers").json()["workers"]
    assert [w["url"] for w in workers] == [srv.url]
    loads = httpx.get(srv.url + "/v1/loads", params={"include": "core"}).json()["loads"]
    assert loads[0]["num_reqs"] == 0


def test_weight_version_through_an_update(srv: Server, ckpt: str) -> None:
    """slime/backends/sglang_utils/sglang_engine.py update_weights_from_disk (model_path, weight_version) and
    slime/ray/actor_group.py's check through GET /get_weight_version; pause / flush / continue as
    update_weight_from_distributed.py's update_weights sends them."""
    import httpx

    assert srv.post("/pause_generation", {}).status_code == 200
    assert httpx.get(srv.url + "/flush_cache").status_code == 200
    r = srv.post("/update_weights_from_disk", {"model_path": ckpt, "weight_version": "7", "load_format": None,
                                               "flush_cache": False, "abort_all_requests": False})
    assert r.status_code == 200, r.text
    assert srv.post("/continue_generation", {}).status_code == 200
    assert httpx.get(srv.url + "/get_weight_version").json() == {"weight_version": "7"}
    assert httpx.get(srv.url + "/model_info").json()["weight_version"] == "7"
    meta = srv.post("/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}).json()["meta_info"]
    assert meta["weight_version"] == "7"
    bad = srv.post("/update_weights_from_disk", {"model_path": ckpt, "load_format": "npcache"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "load_format"


def test_lm_eval_loglikelihood_request(srv: Server, ckpt: str) -> None:
    """lm_eval/models/openai_completions.py LocalCompletionsAPI._create_payload(generate=False) and
    parse_logprobs: echo + logprobs=1 + max_tokens=1 over token ids; token_logprobs[ctxlen:-1] are the
    continuation's log-probs, equal to a full forward's log-softmax (transformers, fp32)."""
    from transformers import AutoModelForCausalLM

    tokens = [11, 12, 13, 14, 15, 16, 17, 18]
    payload = {"model": MODEL, "prompt": [tokens], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    r = srv.post("/v1/completions", payload)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(tokens) + 1 and lp["token_logprobs"][0] is None
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    np.testing.assert_allclose(lp["token_logprobs"][1 : len(tokens)], want.numpy(), atol=1e-4)
    ctxlen = 3  # lm-eval's split: the continuation is tokens[ctxlen:]
    continuation = lp["token_logprobs"][ctxlen:-1]
    tops = lp["top_logprobs"][ctxlen:-1]
    greedy = [x == max(top.values()) for x, top in zip(continuation, tops, strict=True)]
    argmax = (logits[ctxlen - 1 : -1].argmax(-1) == torch.tensor(tokens[ctxlen:])).tolist()
    assert greedy == argmax
    assert choice["text"].startswith(srv_decode(ckpt, tokens))


def srv_decode(ckpt: str, tokens: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt).decode(tokens)


def test_release_and_resume_memory_as_slime_calls_them(srv: Server) -> None:
    """slime/backends/sglang_utils/sglang_engine.py release_memory_occupation (flush_cache, then an empty body:
    every tag) and resume_memory_occupation (tags ["weights"], then ["cuda_graph"], then ["kv_cache"]): while
    released, generation is refused and the heartbeat still answers; after resume, the same greedy rollout."""
    import httpx

    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
            "return_routed_experts": True}
    before = srv.post("/generate", body).json()
    assert httpx.get(srv.url + "/flush_cache").status_code == 200
    r = srv.post("/release_memory_occupation", content=b"")
    assert r.status_code == 200 and r.json() is None, r.text
    assert httpx.get(srv.url + "/health_generate").json()["checked"] == "memory released"
    refused = srv.post("/generate", body)
    assert refused.status_code == 400 and "resume_memory" in refused.json()["error"]["message"], refused.text
    for tags in (["weights"], ["cuda_graph"], ["kv_cache"]):
        r = srv.post("/resume_memory_occupation", {"tags": tags})
        assert r.status_code == 200, r.text
    after = srv.post("/generate", body).json()
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["routed_experts"] == before["meta_info"]["routed_experts"]
    bad = srv.post("/release_memory_occupation", {"tags": ["gpu"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("tags"), bad.text


def test_generate_routing_of_a_model_with_dense_layers(tmp_path) -> None:
    """/generate on tiny glm4_moe with first_k_dense_replace=1 (layer 0 dense, MoE on 1..3): zero rows at the
    dense layer, the compact routing at the MoE columns, read back by from_sglang, a wrong layout refused."""
    from routereplay.routing import decode, from_sglang
    from routereplay.tiny import make_tiny_checkpoint

    d = make_tiny_checkpoint(str(tmp_path / "glm4_moe"), "glm4_moe", first_k_dense_replace=1)
    server = Server(d, tmp_path / "server.log", "--routing-replay", '{"enable": true}')
    try:
        body = {"input_ids": PROMPT, "return_routed_experts": True,
                "sampling_params": {"max_new_tokens": 5, "temperature": 1.0, "sampling_seed": 3}}
        out = server.post("/generate", body).json()
        compact = decode(server.post("/generate", {**body, "routed_experts_compact": True}).json()
                         ["meta_info"]["routed_experts"])
    finally:
        server.stop_gracefully()
    num_layers, moe_ids, top_k = 4, [1, 2, 3], compact.shape[2]
    raw = np.frombuffer(base64.b64decode(out["meta_info"]["routed_experts"]), dtype="<i4")
    full = raw.reshape(len(PROMPT) + len(out["output_ids"]) - 1, num_layers, top_k)
    assert not full[:, 0].any() and (full[:, moe_ids] == compact).all()
    np.testing.assert_array_equal(from_sglang(out["meta_info"]["routed_experts"], moe_ids, num_layers, top_k), compact)
    with pytest.raises(ValueError):
        from_sglang(out["meta_info"]["routed_experts"], [0, 1, 2], num_layers, top_k)  # layer 0 is dense
    with pytest.raises(ValueError):
        from_sglang(out["meta_info"]["routed_experts"], moe_ids, num_layers + 1, top_k)
