"""DeepSeek-V3 family (MLA with a compressed latent cache): exact against transformers and across engine paths."""

import os

import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from routereplay.config import ModelConfig
from routereplay.tiny import COMMON, TINY_CONFIGS, make_tiny_checkpoint
from tests.helpers import assert_logprobs_match_full_forward, reference_forward
from tests.test_capture import DEBUG, assert_positions
from tests.test_engine import GREEDY, prompts, tokens
from tests.test_models import build, our_forward

VARIANTS = {
    "q-lora-yarn": {},  # the TINY_CONFIGS entry: q_lora_rank=24, YaRN (mscale_all_dim=1), interleaved rope
    "no-q-lora-default-rope": dict(q_lora_rank=None, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # mscale != mscale_all_dim: both the cos/sin attention factor and the softmax mscale^2 differ from 1
    "yarn-mscale-half-split": dict(rope_interleave=False, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=128, mscale=1.0,
        mscale_all_dim=0.7)),
}
MANY = dict(n_routed_experts=260, n_group=4, topk_group=2, moe_intermediate_size=8, num_hidden_layers=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("deepseek_v3"))


def checkpoint(root: str, variant: str) -> str:
    path = os.path.join(root, variant)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    overrides = MANY if variant == "many-experts" else VARIANTS[variant]
    return make_tiny_checkpoint(path, "deepseek_v3", **overrides)


def same_sets(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.sort(np.asarray(a, dtype=np.int64), -1), np.sort(np.asarray(b, dtype=np.int64), -1))


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
     "beta_fast": 32, "beta_slow": 1},  # DeepSeek-V3's config.json (legacy key)
    {"type": "yarn", "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},  # no mscale_all_dim: no mscale^2
])
def test_softmax_scale_and_rope_equal_transformers(rope_scaling):
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from routereplay.layers.mla import MLAttention

    cfg = {**COMMON, **TINY_CONFIGS["deepseek_v3"], "rope_parameters": None, "max_position_embeddings": 163840}
    if rope_scaling is not None:
        cfg["rope_scaling"] = {**rope_scaling, "rope_theta": 10000.0}
    c = AutoConfig.for_model("deepseek_v3", **cfg)
    ours = MLAttention(c)
    assert ours.scale == DeepseekV3Attention(c, 0).scaling
    pos = torch.tensor([0, 1, 7, 4095, 50000])
    cos, sin = DeepseekV3RotaryEmbedding(c)(torch.zeros(1), pos[None])
    ours_cos, ours_sin = ours.rotary.cos_sin(pos, torch.float32)  # interleaved: each pair's angle twice
    assert torch.allclose(ours_cos[:, 0::2], cos[0, :, :4], atol=1e-6)
    assert torch.allclose(ours_sin[:, 0::2], sin[0, :, :4], atol=1e-6)


def test_mtp_layers_in_checkpoint_are_ignored(root, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = str(tmp_path / "mtp")
    shutil.copytree(checkpoint(root, "q-lora-yarn"), d)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(64, 128)  # num_hidden_layers=4: an MTP layer
    tensors["model.layers.4.self_attn.kv_b_proj.weight"] = torch.zeros(7, 7)
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    build(d)  # loads (strictly) without complaint


def test_parameter_names_are_transformers_runtime_names(root):
    from transformers import AutoModelForCausalLM

    for variant in ("q-lora-yarn", "no-q-lora-default-rope"):
        d = checkpoint(root, variant)
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        theirs = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
        ours = {n: tuple(t.shape) for n, t in build(d).state_dict().items()}
        assert ours == theirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_experts_match_transformers(root, variant):
    d = checkpoint(root, variant)
    mc = ModelConfig.from_dir(d)
    assert mc.moe_layer_ids == [1, 2, 3]  # first_k_dense_replace=1
    toks = torch.randint(3, 100, (41,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_logits, ref_ids = reference_forward(d, toks)
    model = build(d)
    assert model.model.layers[0].self_attn.cache_spec() == (1, 32 + 8, 0)  # latent + rotated k_pe, no V
    logits, ids = our_forward(model, toks, mc.num_moe_layers, mc.top_k)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert same_sets(ids.numpy(), ref_ids.numpy())


@pytest.mark.parametrize("variant", ["q-lora-yarn", "no-q-lora-default-rope"])
def test_greedy_equals_transformers_generate(root, variant):
    from transformers import AutoModelForCausalLM

    d = checkpoint(root, variant)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    llm = LLM(d, max_model_len=256, block_size=8)
    ps = prompts(3, seed=7)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(temperature=0, max_tokens=12),
                        use_tqdm=False)
    for p, o in zip(ps, outs, strict=True):
        with torch.no_grad():
            g = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert o.outputs[0].token_ids == g[0, len(p):].tolist()


def test_scheduler_paths_give_the_same_tokens(root):
    """Compressed cache under prefix caching, preemption (tiny pool) and chunked prefill (tiny budget)."""
    d = checkpoint(root, "q-lora-yarn")
    ps = prompts(10, seed=3)
    ps = [ps[0][:2] * 6 + p if i % 3 == 0 else p for i, p in enumerate(ps)]  # a shared prefix
    alone = LLM(d, max_model_len=256, block_size=4, enable_prefix_caching=False)
    expected = [tokens(alone.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False))[0] for p in ps]
    for kwargs in (dict(), dict(num_kv_blocks=16), dict(max_num_batched_tokens=7)):
        llm = LLM(d, max_model_len=256, block_size=4, **kwargs)
        llm.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False)
        outs = llm.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False)  # prefix-cache hits
        assert tokens(outs) == expected, kwargs
        if not kwargs:
            assert any(o.num_cached_tokens > 0 for o in outs)
        if "num_kv_blocks" in kwargs:
            assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("variant", ["q-lora-yarn", "no-q-lora-default-rope"])
def test_absorbed_decode_logprobs_equal_full_forward(root, variant):
    """Every sampled token after the first comes from a decode step (absorbed MLA over the latent cache)."""
    from transformers import AutoModelForCausalLM

    d = checkpoint(root, variant)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    llm = LLM(d, max_model_len=256, block_size=4)
    ps = prompts(3, seed=21)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(
        temperature=1.0, max_tokens=10, seed=0, ignore_eos=True), use_tqdm=False)
    assert_logprobs_match_full_forward(ref, ps, outs)


def test_capture_equals_full_forward_and_debug_rows_are_positions(root):
    d = checkpoint(root, "q-lora-yarn")
    ps = prompts(4, seed=8)
    sp = SamplingParams(temperature=1.0, max_tokens=7, seed=5, ignore_eos=True)
    llm = LLM(d, max_model_len=256, block_size=4, routing_replay={"enable": True})
    llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)  # served from the prefix cache
    assert any(o.num_cached_tokens > 0 for o in outs)
    for p, o in zip(ps, outs, strict=True):
        c = o.outputs[0]
        assert c.routed_experts.dtype == np.uint8 and c.routed_experts.shape == (len(p) + 6, 3, 2)
        _, ref_ids = reference_forward(d, p + c.token_ids[:-1])
        assert same_sets(c.routed_experts, ref_ids.numpy())
    llm = LLM(d, max_model_len=256, block_size=4, routing_replay=DEBUG, max_num_batched_tokens=9, num_kv_blocks=24)
    sps = [SamplingParams(temperature=1.0, max_tokens=3 + i, seed=i, ignore_eos=True) for i in range(len(ps))]
    for o in llm.generate(prompt_token_ids=ps + ps, sampling_params=sps + sps, use_tqdm=False):
        assert_positions(o)


def test_more_than_256_experts_route_in_uint16(root):
    d = checkpoint(root, "many-experts")
    mc = ModelConfig.from_dir(d)
    assert mc.num_experts == 260 and str(mc.routing_dtype) == "uint16" and mc.moe_layer_ids == [1]
    llm = LLM(d, max_model_len=256, block_size=4, routing_replay={"enable": True})
    ps = prompts(3, seed=5)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(
        temperature=1.0, max_tokens=6, seed=1, ignore_eos=True), use_tqdm=False)
    high = False
    for p, o in zip(ps, outs, strict=True):
        c = o.outputs[0]
        r = c.routed_experts
        assert r.dtype == np.uint16 and r.shape == (len(p) + 5, 1, 2)
        _, ref_ids = reference_forward(d, p + c.token_ids[:-1])
        assert same_sets(r, ref_ids.numpy())
        high |= bool((r >= 256).any())
    assert high, "no id above 255 was chosen: the test would not catch a truncation to uint8"


def test_tp2_matches_tp1(root):
    """Heads split over 2 ranks (q_b / kv_b column-parallel, o_proj row-parallel); the latent cache is replicated."""
    from tests.test_tp import _run

    d = checkpoint(root, "q-lora-yarn")
    ps = prompts(4, seed=12)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    one, two = _run(d, 1, ps, sp), _run(d, 2, ps, sp)
    for (t1, r1), (t2, r2) in zip(one, two, strict=True):
        assert t1 == t2
        assert same_sets(r1, r2)


def test_kimi_k2_checkpoint_loads_as_deepseek_v3(tmp_path):
    """Kimi-K2 ships DeepSeek-V3's architecture under model_type "kimi_k2" with remote-code auto_map."""
    import json
    import shutil

    src = make_tiny_checkpoint(str(tmp_path / "ds"), "deepseek_v3")
    dst = tmp_path / "kimi"
    shutil.copytree(src, dst)
    cfg = json.load(open(dst / "config.json"))
    cfg.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    json.dump(cfg, open(dst / "config.json", "w"))
    assert ModelConfig.from_dir(str(dst)).family.model_type == "deepseek_v3"
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(src, max_model_len=128, routing_replay={"enable": True}).generate(
        prompt_token_ids=[[5, 6, 7, 8]], sampling_params=sp, use_tqdm=False)[0].outputs[0]
    b = LLM(str(dst), max_model_len=128, routing_replay={"enable": True}).generate(
        prompt_token_ids=[[5, 6, 7, 8]], sampling_params=sp, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.routed_experts, b.routed_experts)
