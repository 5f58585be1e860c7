"""`routereplay inspect` on a store written by the engine: key and token counts, load, heatmap."""

import numpy as np
import pytest

from routereplay import LLM, SamplingParams
from routereplay import store as routing_store
from routereplay.inspect_store import main, summarize
from routereplay.tiny import TINY_CONFIGS, make_tiny_checkpoint

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
NEW_TOKENS = 5
SAMPLES = 2


@pytest.fixture(scope="module")
def engine_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    model_dir = make_tiny_checkpoint(str(root / "model"), "qwen3_moe")
    store_dir = str(root / "routing")
    llm = LLM(model_dir, max_model_len=64, num_kv_blocks=32,
              routing_replay={"enable": True, "store": "local", "local_store_dir": store_dir})
    params = [SamplingParams(n=SAMPLES, max_tokens=NEW_TOKENS, ignore_eos=True, seed=i, rollout_id=f"r{i}")
              for i in range(len(PROMPTS))]
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    llm.close()
    routing = {c.routing_key: c.routed_experts for o in outs for c in o.outputs}
    return store_dir, routing, TINY_CONFIGS["qwen3_moe"]["num_experts"]


def test_counts_and_heatmap(engine_store, tmp_path, capsys):
    store_dir, routing, num_experts = engine_store
    png = tmp_path / "load.png"
    assert main([store_dir, "--plot", str(png), "--num-experts", str(num_experts)]) == 0
    out = capsys.readouterr().out
    tokens = sum(len(p) + NEW_TOKENS - 1 for p in PROMPTS) * SAMPLES
    assert f"keys: {len(PROMPTS) * SAMPLES} (" in out
    assert f"tokens: {tokens} (" in out
    layers, top_k = next(iter(routing.values())).shape[1:]
    assert f"bytes: {tokens * layers * top_k} (uint8" in out
    assert f"experts: {num_experts}\n" in out
    assert len([line for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]) == layers
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_key_and_prefix(engine_store, capsys):
    store_dir, routing, _ = engine_store
    assert main([store_dir, "r1/0"]) == 0
    out = capsys.readouterr().out
    assert "keys: 1 (r1/0)" in out and f"tokens: {len(PROMPTS[1]) + NEW_TOKENS - 1} (" in out
    assert main([store_dir, "r0"]) == 0  # not a key: a prefix
    assert "keys: 2 (r0/0, r0/1)" in capsys.readouterr().out


def test_load_matches_the_engine_outputs(engine_store):
    store_dir, routing, num_experts = engine_store
    with routing_store.open(store_dir) as store:
        summary = summarize(store, store.keys(), num_experts)
    ids = np.concatenate(list(routing.values()))
    expected = np.stack([np.bincount(ids[:, layer].ravel(), minlength=num_experts) for layer in range(ids.shape[1])])
    np.testing.assert_array_equal(summary.load, expected)
    assert summary.tokens == ids.shape[0]
    assert all(0 < s["entropy"] <= 1 for s in summary.layer_stats())


def test_errors(engine_store, capsys):
    store_dir, _, _ = engine_store
    assert main([store_dir, "missing"]) == 1
    assert "no routing keys matching 'missing'" in capsys.readouterr().err
    assert main([store_dir, "--num-experts", "1"]) == 1
    assert "expert id" in capsys.readouterr().err


def test_a_missing_store_dir_is_an_error_and_is_not_created(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    assert main([str(missing)]) == 1
    assert "no store directory" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
