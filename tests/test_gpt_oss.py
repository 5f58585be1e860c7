"""GPT-OSS in the engine: sinks, sliding windows, biased router and clamped-SwiGLU experts against transformers."""

import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from routereplay.config import ModelConfig
from routereplay.tiny import make_tiny_checkpoint
from tests.helpers import assert_logprobs_match_full_forward, reference_forward
from tests.test_capture import DEBUG, assert_positions
from tests.test_engine import prompts, tokens
from tests.test_models import build, our_forward

WINDOW = 6  # TINY_CONFIGS["gpt_oss"]: shorter than every test sequence below


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny checkpoint with every bias and sink random and large gate/up weights (so the clamp acts)."""
    from transformers import AutoModelForCausalLM

    d = make_tiny_checkpoint(str(tmp_path_factory.mktemp("gpt_oss") / "ckpt"), "gpt_oss")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("_bias", "sinks")) or ("self_attn" in name and name.endswith(".bias")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("gate_up_proj"):
                p.mul_(6.0)
    hf.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def test_config_has_windowed_and_full_layers(ckpt):
    c = ModelConfig.from_dir(ckpt).hf_config
    assert c.sliding_window == WINDOW and set(c.layer_types) == {"sliding_attention", "full_attention"}
    assert c.rope_parameters["rope_type"] == "yarn"


def test_clamp_is_exercised(ckpt):
    model = build(ckpt)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(64, experts.gate_up_proj.shape[1], generator=torch.Generator().manual_seed(0))
    gate_up = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (gate_up.abs() > experts.limit).any()


def test_logits_and_experts_match_transformers(ckpt):
    mc = ModelConfig.from_dir(ckpt)
    toks = torch.randint(3, 120, (41,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_logits, ref_ids = reference_forward(ckpt, toks)  # hooks GptOssTopKRouter (its o[2] = indices)
    logits, ids = our_forward(build(ckpt), toks, mc.num_moe_layers, mc.top_k)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert ids.shape == ref_ids.shape == (41, 4, 2)
    assert torch.equal(ids.long().sort(-1).values, ref_ids.long().sort(-1).values)


def test_greedy_equals_transformers_generate(ckpt, hf):
    llm = LLM(ckpt, max_model_len=256, block_size=4)
    ps = prompts(3, seed=7, lo=WINDOW + 2, hi=30)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(temperature=0, max_tokens=12,
                                                                            ignore_eos=True), use_tqdm=False)
    for p, o in zip(ps, outs, strict=True):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None)  # no stop: 12 tokens as with ignore_eos
        assert o.outputs[0].token_ids == g[0, len(p):].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(ckpt):
    llm = LLM(ckpt, max_model_len=256, block_size=4, enable_prefix_caching=False)
    ps = prompts(8, seed=3, lo=2, hi=30)
    ps = [ps[0][:3] * 5 + p if i % 2 else p for i, p in enumerate(ps)]  # a shared 15-token prefix
    return ps, [tokens(llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False))[0] for p in ps]


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_kv_blocks=14), dict(max_num_batched_tokens=7)],
    ids=["batched-prefix-cache", "preemption", "chunked-prefill"],
)
def test_scheduler_paths_give_the_same_tokens(ckpt, alone, kwargs):
    ps, expected = alone
    llm = LLM(ckpt, max_model_len=256, block_size=4, **kwargs)
    first = tokens(llm.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False))
    second = llm.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False)
    assert first == expected and tokens(second) == expected
    if "num_kv_blocks" in kwargs:
        assert llm.engine.scheduler.num_preemptions > 0
    if not kwargs:
        assert any(o.num_cached_tokens > 0 for o in second)


def test_logprobs_equal_full_forward_log_softmax(ckpt, hf):
    llm = LLM(ckpt, max_model_len=256, block_size=4, max_num_batched_tokens=9)
    ps = prompts(3, seed=21, lo=WINDOW, hi=25)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(
        temperature=1.0, max_tokens=10, seed=0, ignore_eos=True), use_tqdm=False)
    assert_logprobs_match_full_forward(hf, ps, outs)


def test_routed_experts_equal_full_forward_selection(ckpt):
    ps = prompts(3, seed=8, lo=WINDOW, hi=30)
    sp = SamplingParams(temperature=1.0, max_tokens=7, seed=5, ignore_eos=True)
    llm = LLM(ckpt, max_model_len=256, block_size=4, max_num_batched_tokens=11, routing_replay={"enable": True})
    llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)  # served from the prefix cache
    assert any(o.num_cached_tokens > 0 for o in outs)
    for p, o in zip(ps, outs, strict=True):
        c = o.outputs[0]
        r = c.routed_experts
        assert r.dtype == np.uint8 and r.shape == (len(p) + len(c.token_ids) - 1, 4, 2)
        _, ref_ids = reference_forward(ckpt, p + c.token_ids[:-1])
        np.testing.assert_array_equal(np.sort(r, -1), np.sort(ref_ids.numpy(), -1).astype(np.uint8))


def test_debug_rows_are_positions(ckpt):
    llm = LLM(ckpt, max_model_len=256, block_size=4, routing_replay=DEBUG, num_kv_blocks=20,
              max_num_batched_tokens=13)
    ps = prompts(8, seed=4, lo=2, hi=30)
    sps = [SamplingParams(temperature=1.0, max_tokens=3 + i, seed=i, ignore_eos=True) for i in range(len(ps))]
    for o in llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False):
        assert_positions(o)


def test_update_weights_from_transformers_named_parameters(ckpt, hf):
    llm = LLM(ckpt, max_model_len=256, block_size=4)
    model = llm.engine.runner.model
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert llm.update_weights(hf.named_parameters()) == len(list(hf.named_parameters()))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
