"""Fused decode-step kernels (kernels/fused.py): the references against the unfused math they replace (CPU,
bit for bit), the Triton kernels under the interpreter (TRITON_INTERPRET=1 with triton installed), and on a
GPU (marked ``gpu``) against the references on fresh random bf16 / fp32 inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from routereplay.config import ModelConfig
from routereplay.context import Context, get_context, reset_context, set_context
from routereplay.kernels import fused
from routereplay.kernels.fused import (
    HAS_TRITON,
    add_rms_norm,
    add_rms_norm_ref,
    counter_uniform,
    gumbel_sample,
    gumbel_sample_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
    rms_norm,
    rms_norm_ref,
)
from routereplay.layers.rotary import Rotary
from routereplay.layers.sampler import sample
from routereplay.models.loader import load_checkpoint
from routereplay.models.transformer import MoECausalLM
from tests.helpers import FAMILIES, tiny_checkpoint

INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET, reason="interpreter tests need TRITON_INTERPRET=1 and triton")
if INTERPRET:  # triton 3.6's interpreter holds scalars as 1-element arrays, which numpy >= 2.4 won't int()
    import triton.runtime.interpreter as _interp

    if not getattr(_interp._patch_lang_tensor, "_routereplay_patched", False):
        _orig_patch = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _orig_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _patch_lang_tensor._routereplay_patched = True
        _interp._patch_lang_tensor = _patch_lang_tensor

requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA, triton")

# (seed, position, token) whose noise hit the top value: with 24 random bits it rounded to 1.0 in fp32 (Gumbel
# noise +inf: sampled whatever its logit). With 23 bits it must stay below 1 and the likely token must win.
U_ONE = (351, 0, 16280)


# ----------------------------------------------------------------------------------------------------------
# The unfused math, as it was before the fusion (the references must equal it bit for bit)
# ----------------------------------------------------------------------------------------------------------


def old_rms_norm(x, weight, eps):
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def old_rotary(rotary: Rotary, positions, q, k):
    freqs = positions[:, None].float() * rotary.inv_freq[None, :]
    if rotary.interleaved:
        cos = (freqs.cos() * rotary.scaling).repeat_interleave(2, -1)[:, None]
        sin = (freqs.sin() * rotary.scaling).repeat_interleave(2, -1)[:, None]

        def rot(x):
            pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
            return (x.float() * cos + pairs.float() * sin).to(x.dtype)

        return rot(q), rot(k)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * rotary.scaling).to(q.dtype)[:, None]
    sin = (emb.sin() * rotary.scaling).to(q.dtype)[:, None]
    dim = rotary.rotary_dim

    def rot(x):
        r, rest = x[..., :dim], x[..., dim:]
        x1, x2 = r[..., : dim // 2], r[..., dim // 2 :]
        out = r * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    return rot(q), rot(k)


def old_untruncated_sample(logits, temperature, seed, position):
    greedy = temperature == 0
    logp_plain = torch.log_softmax(logits, dim=-1)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    gumbel = -torch.log(-torch.log(counter_uniform(seed, position, logits.shape[-1])))
    sampled = torch.argmax(logp + gumbel, dim=-1)
    tokens = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
    chosen = torch.where(greedy[:, None], logp_plain, logp)
    return tokens, chosen.gather(1, tokens[:, None]).squeeze(1)


class _Cfg:
    def __init__(self, partial=1.0, rope_theta=10000.0):
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": partial}


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _sampling_inputs(s, v, seed=0, device="cpu", greedy_every=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, v, generator=g) * 3
    temperature = torch.tensor([0.0 if i % greedy_every == 0 else (0.7, 1.0, 1.3)[i % 3] for i in range(s)])
    seeds = torch.randint(0, 2**62, (s,), generator=g)
    seeds[0] = -seeds[0]  # negative seeds are valid int64 too
    positions = torch.randint(0, 100000, (s,), generator=g)
    to = lambda t: t.to(device)
    return to(logits), to(temperature), to(seeds), to(positions)


# ----------------------------------------------------------------------------------------------------------
# CPU: references = the old math, bit for bit
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_refs_equal_old_math(dtype):
    x = _rand(7, 3, 64, dtype=dtype)
    w = _rand(64, dtype=dtype, seed=1) + 1
    assert torch.equal(rms_norm(x, w, 1e-6), old_rms_norm(x, w, 1e-6))
    delta = _rand(7, 3, 64, dtype=dtype, seed=2)
    h, y = add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(h, x + delta) and torch.equal(y, old_rms_norm(x + delta, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial,interleaved,norm", [(1.0, False, True), (0.5, False, False), (1.0, True, False),
                                                      (0.5, False, True)])
def test_cached_cos_sin_and_qk_norm_rope_equal_old_rotary(dtype, partial, interleaved, norm):
    rotary = Rotary(_Cfg(partial), 32, interleaved)
    positions = torch.tensor([0, 5, 17, 4095, 3, 3])
    q, k = _rand(6, 4, 32, dtype=dtype), _rand(6, 2, 32, dtype=dtype, seed=1)
    qw, kw = _rand(32, dtype=dtype, seed=2) + 1, _rand(32, dtype=dtype, seed=3) + 1
    cos, sin = rotary.cos_sin(positions, dtype)
    assert cos.dtype == (torch.float32 if interleaved else dtype) and cos.shape == (6, rotary.rotary_dim)
    if norm:
        out = qk_norm_rope(q, k, cos, sin, rotary.rotary_dim, interleaved, qw, kw, 1e-6)
        want = old_rotary(rotary, positions, old_rms_norm(q, qw, 1e-6), old_rms_norm(k, kw, 1e-6))
    else:
        out = qk_norm_rope(q, k, cos, sin, rotary.rotary_dim, interleaved)
        want = old_rotary(rotary, positions, q, k)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    plain = old_rotary(rotary, positions, q, k)
    assert all(torch.equal(a, b) for a, b in zip(rotary(positions, q, k), plain, strict=True))


def _build(model_dir, dtype):
    mc = ModelConfig.from_dir(model_dir)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as the model runner builds it (fp32 routers stay fp32)
    try:
        model = MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids)
    finally:
        torch.set_default_dtype(default)
    load_checkpoint(model, model_dir)
    return model.eval(), mc


def _old_backbone(model, ids):
    """The unfused forward: residual adds in the layer, rotary recomputed in every layer."""
    bb = model.model
    h = bb.embed_tokens(ids)
    for layer in bb.layers:
        h = h + layer.self_attn(layer.input_layernorm(h))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return bb.norm(h)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fused_ckpts"))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backbone_equals_unfused_forward(ckpt_root, model_type, dtype):
    model, mc = _build(tiny_checkpoint(ckpt_root, model_type), dtype)
    n = 23
    ids = torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(4))
    cache = torch.zeros(n + 1, mc.num_moe_layers, mc.top_k, dtype=torch.int32)
    old_cache = cache.clone()
    with torch.no_grad():
        set_context(Context(positions=torch.arange(n), slot_mapping=torch.arange(n), routing_cache=cache))
        try:
            new = model(ids)
            assert get_context().rope_cos is not None  # filled once by the backbone
        finally:
            reset_context()
        set_context(Context(positions=torch.arange(n), slot_mapping=torch.arange(n), routing_cache=old_cache))
        try:
            old = _old_backbone(model, ids)  # no cached cos/sin: each layer computes its own
        finally:
            reset_context()
    assert torch.equal(new, old) and torch.equal(cache, old_cache)


def test_untruncated_sampling_ref_equals_old_math():
    logits, t, seeds, pos = _sampling_inputs(40, 1000)
    a = gumbel_sample(logits, t, seeds, pos)
    b = old_untruncated_sample(logits, t, seeds, pos)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    k, p = torch.full((40,), -1), torch.ones(40)
    c = sample(logits, t, k, p, seeds, pos, truncate=False)
    assert torch.equal(c[0], b[0]) and torch.equal(c[1], b[1])


def test_counter_noise_never_rounds_to_one():
    """No token may get +inf Gumbel noise (it would be sampled at any logit)."""
    seed, pos, tok = U_ONE
    u = counter_uniform(torch.tensor([seed]), torch.tensor([pos]), tok + 1)
    assert (u < 1).all() and (u > 0).all()
    u = counter_uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), 151936)
    assert u.max() < 1 and u.min() > 0


# ----------------------------------------------------------------------------------------------------------
# Triton interpreter (CPU): the kernels' logic at small shapes
# ----------------------------------------------------------------------------------------------------------


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter mis-rounds bf16
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 128), (1, 200)])
@pytest.mark.parametrize("add", [False, True])
def test_interp_rms_norm(dtype, shape, add):
    x = _rand(*shape, dtype=dtype)
    w = (_rand(shape[-1], seed=1) + 1).to(dtype)
    if add:
        delta = _rand(*shape, seed=2, dtype=dtype)
        h, y = fused._rms_norm_triton(x, w, 1e-6, delta=delta)
        h_ref, y_ref = add_rms_norm_ref(x, delta, w, 1e-6)
        assert torch.equal(h, h_ref)
    else:
        y, y_ref = fused._rms_norm_triton(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-3)


@interpret
@pytest.mark.parametrize("hq,hk,d,partial,interleaved,norm", [
    (4, 2, 32, 1.0, False, True), (6, 2, 32, 0.5, False, False), (4, 4, 16, 1.0, True, False),
    (3, 1, 24, 0.5, False, True), (8, 2, 64, 1.0, False, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_qk_norm_rope(hq, hk, d, partial, interleaved, norm, dtype):
    rotary = Rotary(_Cfg(partial), d, interleaved)
    positions = torch.tensor([0, 9, 1000, 7])
    qkv = _rand(4, hq + 2 * hk, d, dtype=dtype, scale=3)  # strided q/k views, as split from a fused projection
    q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    qw, kw = ((_rand(d, seed=2) + 1).to(dtype), (_rand(d, seed=3) + 1).to(dtype)) if norm else (None, None)
    cos, sin = rotary.cos_sin(positions, dtype)
    out = fused._qk_norm_rope_triton(q, k, cos, sin, rotary.rotary_dim, interleaved, qw, kw, 1e-6)
    ref = qk_norm_rope_ref(q, k, cos, sin, rotary.rotary_dim, interleaved, qw, kw, 1e-6)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-3)
        if dtype == torch.float16 and not norm:
            assert torch.equal(a, b)  # each product and the sum rounded like the reference


@interpret
def test_interp_gumbel_sample(monkeypatch):
    monkeypatch.setattr(fused, "SAMPLE_SPLIT", 256)
    monkeypatch.setattr(fused, "SAMPLE_BLOCK", 128)
    logits, t, seeds, pos = _sampling_inputs(12, 1000, seed=1)
    logits[3, :500] = float("-inf")  # masked vocabulary, and a split with nothing but -inf
    tokens, lp = fused._gumbel_sample_triton(logits, t, seeds, pos)
    ref_tokens, ref_lp = gumbel_sample_ref(logits, t, seeds, pos)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    sub = fused._gumbel_sample_triton(logits[4:7], t[4:7], seeds[4:7], pos[4:7])
    assert torch.equal(sub[0], tokens[4:7]) and torch.equal(sub[1], lp[4:7])


@interpret
def test_interp_gumbel_noise_is_counter_uniform_bit_exact(monkeypatch):
    """Flat logits: the choice is the argmax of the noise alone, so any bit of the hash that differs shows."""
    seed, pos, tok = U_ONE
    v = tok + 7
    seeds = torch.tensor([seed, 1, -5, 2**62 + 3])
    positions = torch.tensor([pos, 0, 77, 123456])
    logits = torch.zeros(4, v)
    logits[0, 0] = 50.0  # token 0 is all but certain (U_ONE's top noise value must not beat it)
    t = torch.ones(4)
    tokens, lp = fused._gumbel_sample_triton(logits, t, seeds, positions)
    ref_tokens, ref_lp = gumbel_sample_ref(logits, t, seeds, positions)
    assert tokens[0] == 0 and torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# GPU: Triton kernels against the references on fresh random inputs (outputs start as NaN)
# ----------------------------------------------------------------------------------------------------------


def poison_allocator(nbytes=1 << 28):
    """Leave NaN bytes (0xFF) in the caching allocator's free blocks so unwritten outputs show up."""
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
    torch.cuda.synchronize()


def _tol(dtype):
    return {"rtol": 1.6e-2, "atol": 1.6e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2048), (129, 2048), (7, 200), (3, 5, 128), (2, 4096)])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.gpu
@requires_gpu
def test_gpu_rms_norm(dtype, shape, add):
    torch.manual_seed(sum(shape))
    x = torch.randn(*shape, device="cuda", dtype=dtype)
    w = (torch.rand(shape[-1], device="cuda") + 0.5).to(dtype)
    poison_allocator()
    if add:
        delta = torch.randn_like(x)
        h, y = add_rms_norm(x, delta, w, 1e-6)
        h_ref, y_ref = add_rms_norm_ref(x, delta, w, 1e-6)
        assert torch.equal(h, h_ref)  # the add rounds exactly like the reference's
    else:
        y, y_ref = rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 128, 1000])
@pytest.mark.parametrize("hq,hk,d,partial,interleaved,norm", [
    (32, 4, 128, 1.0, False, True),  # Qwen3-30B-A3B: q/k norm + full rotary
    (12, 4, 128, 0.5, False, False),  # GLM-4.5: partial rotary
    (12, 4, 128, 0.5, False, True),  # GLM-4.5 with use_qk_norm
    (20, 4, 128, 1.0, True, False),  # ERNIE: interleaved pairs in fp32
    (7, 1, 64, 1.0, False, False),  # odd head counts, MQA
])
@pytest.mark.gpu
@requires_gpu
def test_gpu_qk_norm_rope(dtype, n, hq, hk, d, partial, interleaved, norm):
    torch.manual_seed(n + hq)
    rotary = Rotary(_Cfg(partial, 1e6), d, interleaved).cuda()
    positions = torch.randint(0, 40000, (n,), device="cuda")
    qkv = torch.randn(n, hq + 2 * hk, d, device="cuda", dtype=dtype) * 3
    q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    qw = (torch.rand(d, device="cuda") + 0.5).to(dtype) if norm else None
    kw = (torch.rand(d, device="cuda") + 0.5).to(dtype) if norm else None
    cos, sin = rotary.cos_sin(positions, dtype)
    poison_allocator()
    out = qk_norm_rope(q, k, cos, sin, rotary.rotary_dim, interleaved, qw, kw, 1e-6)
    ref = qk_norm_rope_ref(q, k, cos, sin, rotary.rotary_dim, interleaved, qw, kw, 1e-6)
    for a, b in zip(out, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.isfinite(a).all()
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        elif not norm and not interleaved:
            assert torch.equal(a, b)  # each product and the sum rounded like the reference
        else:
            # An ulp of difference in a normed value (other reduction order) survives the rotation even where
            # the two products cancel: bound by 2 ulps of the operands' scale, and require it to be rare.
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=6.5e-2)
            assert (a != b).float().mean().item() < 1e-3


@pytest.mark.parametrize("s", [1, 64, 130])
@pytest.mark.gpu
@requires_gpu
def test_gpu_gumbel_sample_matches_reference(s):
    logits, t, seeds, pos = _sampling_inputs(s, 151936, seed=s, device="cuda", greedy_every=4)
    poison_allocator()
    tokens, lp = gumbel_sample(logits, t, seeds, pos)
    ref_tokens, ref_lp = gumbel_sample_ref(logits, t, seeds, pos)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=2e-4)
    # The same rows in other batch compositions: bit-identical tokens and log-probs.
    perm = torch.randperm(s, device="cuda")
    again = gumbel_sample(logits[perm], t[perm], seeds[perm], pos[perm])
    assert torch.equal(again[0], tokens[perm]) and torch.equal(again[1], lp[perm])
    one = gumbel_sample(logits[-1:], t[-1:], seeds[-1:], pos[-1:])
    assert torch.equal(one[0], tokens[-1:]) and torch.equal(one[1], lp[-1:])
    big = torch.cat([logits, logits[:3]])
    more = gumbel_sample(big, torch.cat([t, t[:3]]), torch.cat([seeds, seeds[:3]]), torch.cat([pos, pos[:3]]))
    assert torch.equal(more[0][:s], tokens) and torch.equal(more[1][:s], lp)


@pytest.mark.gpu
@requires_gpu
def test_gpu_gumbel_noise_is_counter_uniform_bit_exact():
    """Flat logits: tokens are the argmax of the noise alone, same as the reference."""
    g = torch.Generator().manual_seed(9)
    s, v = 256, 151936
    seeds = torch.randint(-(2**62), 2**62, (s,), generator=g)
    positions = torch.randint(0, 2**40, (s,), generator=g)
    seeds[0], positions[0] = U_ONE[0], U_ONE[1]
    logits = torch.zeros(s, v, device="cuda")
    logits[0, 0] = 50.0
    t = torch.ones(s, device="cuda")
    tokens, _ = gumbel_sample(logits, t, seeds.cuda(), positions.cuda())
    ref_tokens, _ = gumbel_sample_ref(logits, t, seeds.cuda(), positions.cuda())
    assert tokens[0] == 0  # the top noise value no longer beats a logit of 50
    assert torch.equal(tokens, ref_tokens)
