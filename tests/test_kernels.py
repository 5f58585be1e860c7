"""Kernels: references against dumb independent implementations (CPU, no triton needed), the Triton kernels
under the interpreter (only with TRITON_INTERPRET=1 and triton installed), and on a GPU (marked ``gpu``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from routereplay.kernels import HAS_TRITON, decode_attention, fused_moe, prefill_attention, store_kv
from routereplay.kernels import attention as attn_mod
from routereplay.kernels import moe as moe_mod
from routereplay.kernels.attention import decode_attention_ref, prefill_attention_ref, store_kv_ref
from routereplay.kernels.moe import fused_moe_ref
from tests.helpers import capture_graph

INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET, reason="interpreter tests need TRITON_INTERPRET=1 and triton")
if INTERPRET:  # triton 3.6's interpreter holds scalars as 1-element arrays, which numpy >= 2.4 won't int()
    import triton.runtime.interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA, triton")


# ----------------------------------------------------------------------------------------------------------
# Builders and dumb references
# ----------------------------------------------------------------------------------------------------------


def paged_batch(ctx_lens, q_lens, hq, hkv, d, block_size, *, dtype=torch.float32, device="cpu", seed=0,
                unused=-1, spare_blocks=3):
    """Random caches whose blocks are assigned in shuffled order; queries for the last q_len positions."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(c / block_size) for c in ctx_lens]
    total = sum(need) + spare_blocks
    perm = torch.randperm(total, generator=g)
    max_blocks = max(need + [1]) + 1  # one unused column past the longest sequence
    tables = torch.full((len(ctx_lens), max_blocks), unused, dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used:used + n].to(torch.int32)
        used += n
    k_cache = torch.randn(total, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(total, block_size, hkv, d, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    to = lambda t: t.to(device)
    return to(q), to(k_cache), to(v_cache), to(tables), to(cu), to(ctx)


def dumb_attention(q, k_cache, v_cache, tables, cu, ctx_lens, scale):
    """Per sequence, per query, per head: gather K/V token by token, causal softmax in float64."""
    N, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    grp = hq // hkv
    out = torch.zeros(N, hq, d, dtype=torch.float64)
    for s in range(len(ctx_lens)):
        ctx = int(ctx_lens[s])
        q0, q1 = int(cu[s]), int(cu[s + 1])
        if ctx == 0:
            continue
        ks = torch.stack([k_cache[int(tables[s, p // bs]), p % bs] for p in range(ctx)]).double().cpu()
        vs = torch.stack([v_cache[int(tables[s, p // bs]), p % bs] for p in range(ctx)]).double().cpu()
        for i in range(q1 - q0):
            pos = ctx - (q1 - q0) + i
            for h in range(hq):
                sc = ks[: pos + 1, h // grp] @ q[q0 + i, h].double().cpu() * scale
                out[q0 + i, h] = torch.softmax(sc, 0) @ vs[: pos + 1, h // grp]
    return out


def dumb_moe(x, w13, w2, ids, wts):
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[n, k])
            gu = w13[e].double().cpu() @ x[n].double().cpu()
            act = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
            out[n] += float(wts[n, k]) * (w2[e].double().cpu() @ act)
    return out


def routing(n, e, k, seed=0, device="cpu", id_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k)
    wts = torch.rand(n, k, generator=g)
    wts = wts / wts.sum(-1, keepdim=True)
    return ids.to(id_dtype).to(device), wts.float().to(device)


def moe_weights(e, h, inter, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / math.sqrt(h)).to(dtype).to(device)
    w2 = (torch.randn(e, h, inter, generator=g) / math.sqrt(inter)).to(dtype).to(device)
    return w13, w2


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------------
# CPU: references against dumb implementations
# ----------------------------------------------------------------------------------------------------------

# (context_len, q_len): plain prefill, cached prefix, middle chunk, decode row, block-aligned, 1-token prompt
PREFILL_CASES = [(13, 13), (37, 5), (20, 7), (9, 1), (16, 16), (1, 1)]


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("unused", [-1, 0])
def test_prefill_ref_matches_dumb(block_size, hq, hkv, unused):
    ctx_lens, q_lens = zip(*PREFILL_CASES, strict=True)
    q, kc, vc, bt, cu, ctx = paged_batch(ctx_lens, q_lens, hq, hkv, 8, block_size, unused=unused)
    scale = 8 ** -0.5
    out = prefill_attention(q, kc, vc, bt, cu, ctx, scale, max(q_lens))
    assert rel_err(out, dumb_attention(q, kc, vc, bt, cu, ctx, scale)) < 1e-6


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 1), (2, 2)])
def test_decode_ref_matches_dumb(block_size, hq, hkv):
    ctx_lens = [1, 5, 17, 33, 0, 16]  # includes a CUDA-graph padding row (context_len 0)
    q, kc, vc, bt, cu, ctx = paged_batch(ctx_lens, [1] * len(ctx_lens), hq, hkv, 8, block_size)
    out = decode_attention(q, kc, vc, bt, ctx, 0.3)
    assert torch.isfinite(out).all() and out[4].abs().max() == 0
    assert rel_err(out, dumb_attention(q, kc, vc, bt, cu, ctx, 0.3)) < 1e-6


def test_decode_ref_equals_prefill_ref_with_one_query():
    ctx_lens = [3, 40, 7]
    q, kc, vc, bt, cu, ctx = paged_batch(ctx_lens, [1, 1, 1], 4, 2, 8, 4)
    a = decode_attention_ref(q, kc, vc, bt, ctx, 0.5)
    b = prefill_attention_ref(q, kc, vc, bt, cu, ctx, 0.5, 1)
    torch.testing.assert_close(a, b)


def test_store_kv_skips_negative_slots():
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(6, 4, 2, 8, generator=g)
    vc = torch.randn(6, 4, 2, 8, generator=g)
    k0, v0 = kc.clone(), vc.clone()
    slots = torch.tensor([5, -1, 17, 0, -1, 23])
    k = torch.randn(6, 2, 8, generator=g)
    v = torch.randn(6, 2, 8, generator=g)
    store_kv(k, v, kc, vc, slots)
    for n, s in enumerate(slots.tolist()):
        if s >= 0:
            k0[s // 4, s % 4] = k[n]
            v0[s // 4, s % 4] = v[n]
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


def test_store_then_attend_roundtrip():
    """store_kv writes what prefill then reads: the engine's order of calls within one layer."""
    g = torch.Generator().manual_seed(2)
    bs, hkv, d = 4, 2, 8
    kc = torch.zeros(10, bs, hkv, d)
    vc = torch.zeros(10, bs, hkv, d)
    bt = torch.tensor([[7, 2, 9, -1]], dtype=torch.int32)
    n = 11
    slots = torch.tensor([int(bt[0, p // bs]) * bs + p % bs for p in range(n)] + [-1])
    k = torch.randn(n + 1, hkv, d, generator=g)
    v = torch.randn(n + 1, hkv, d, generator=g)
    store_kv(k, v, kc, vc, slots)
    q = torch.randn(n, 4, d, generator=g)
    cu = torch.tensor([0, n], dtype=torch.int32)
    ctx = torch.tensor([n], dtype=torch.int32)
    out = prefill_attention(q, kc, vc, bt, cu, ctx, 0.4, n)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k[:n].repeat_interleave(2, 1).transpose(0, 1),
        v[:n].repeat_interleave(2, 1).transpose(0, 1), is_causal=True, scale=0.4).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (7, 8, 3), (40, 6, 2), (0, 4, 2)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_fused_moe_ref_matches_dumb(n, e, k, id_dtype):
    h, inter = 16, 12
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, h, generator=g)
    w13, w2 = moe_weights(e, h, inter)
    ids, wts = routing(n, e, k, id_dtype=id_dtype)
    out = fused_moe(x, w13, w2, ids, wts)
    assert out.shape == (n, h) and out.dtype == x.dtype
    if n:
        assert rel_err(out, dumb_moe(x, w13, w2, ids, wts)) < 1e-6


def test_fused_moe_ref_bf16_accumulates_in_fp32():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 32, generator=g).bfloat16()
    w13, w2 = moe_weights(8, 32, 16, dtype=torch.bfloat16)
    ids, wts = routing(5, 8, 2)
    out = fused_moe(x, w13, w2, ids, wts)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, dumb_moe(x, w13, w2, ids, wts)) < 1e-2


def test_fused_moe_out_dtype_fp32_is_the_unrounded_sum():
    """Tensor-parallel partial outputs stay fp32 until after the cross-rank sum."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 32, generator=g).bfloat16()
    w13, w2 = moe_weights(8, 32, 16, dtype=torch.bfloat16)
    ids, wts = routing(6, 8, 2)
    full = fused_moe(x, w13, w2, ids, wts, out_dtype=torch.float32)
    assert full.dtype == torch.float32
    assert torch.equal(full.bfloat16(), fused_moe(x, w13, w2, ids, wts))


# ----------------------------------------------------------------------------------------------------------
# Triton interpreter (CPU): the kernels' logic, tiny shapes; fp32/fp16 (the interpreter mis-handles bf16 dots)
# ----------------------------------------------------------------------------------------------------------


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_store_kv(dtype):
    g = torch.Generator().manual_seed(5)
    kc = torch.randn(5, 4, 2, 16, generator=g).to(dtype)
    vc = torch.randn(5, 4, 2, 16, generator=g).to(dtype)
    kr, vr = kc.clone(), vc.clone()
    slots = torch.tensor([3, -1, 19, 0, 8, -1])
    qkv = torch.randn(6, 3, 2, 16, generator=g).to(dtype)  # strided k/v views, as split from a fused qkv
    k, v = qkv[:, 1], qkv[:, 2]
    attn_mod._store_kv_triton(k, v, kc, vc, slots)
    store_kv_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@interpret
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("block_size,hq,hkv,d", [(4, 4, 2, 16), (16, 8, 2, 24), (16, 3, 1, 32)])
def test_interp_decode(monkeypatch, splits, block_size, hq, hkv, d):
    monkeypatch.setattr(attn_mod, "DECODE_BLOCK_N", 16)
    ctx_lens = [1, 5, 37, 70, 0, 16]
    q, kc, vc, bt, cu, ctx = paged_batch(ctx_lens, [1] * 6, hq, hkv, d, block_size)
    out = torch.full_like(q, float("nan"))
    attn_mod._decode_attention_triton(q, kc, vc, bt, ctx, 0.3, num_splits=splits, out=out)
    assert out[4].abs().max() == 0
    assert rel_err(out, decode_attention_ref(q, kc, vc, bt, ctx, 0.3)) < 1e-5


@interpret
def test_interp_decode_fp16_default_tiles():
    q, kc, vc, bt, cu, ctx = paged_batch([200, 3], [1, 1], 8, 2, 32, 16, dtype=torch.float16)
    out = attn_mod._decode_attention_triton(q, kc, vc, bt, ctx, 0.2)
    assert rel_err(out, decode_attention_ref(q, kc, vc, bt, ctx, 0.2)) < 2e-3


@interpret
@pytest.mark.parametrize("block_size,hq,hkv,d", [(4, 4, 2, 16), (16, 6, 2, 24)])
def test_interp_prefill(monkeypatch, block_size, hq, hkv, d):
    monkeypatch.setattr(attn_mod, "PREFILL_BLOCK_M", 16)
    monkeypatch.setattr(attn_mod, "PREFILL_BLOCK_N", 16)
    cases = [(45, 45), (70, 22), (33, 1), (16, 16), (50, 17), (5, 0)]  # incl. an empty query range
    ctx_lens, q_lens = zip(*cases, strict=True)
    q, kc, vc, bt, cu, ctx = paged_batch(ctx_lens, q_lens, hq, hkv, d, block_size)
    out = torch.full_like(q, float("nan"))
    attn_mod._prefill_attention_triton(q, kc, vc, bt, cu, ctx, 0.25, max(q_lens), out=out)
    assert rel_err(out, dumb_attention(q, kc, vc, bt, cu, ctx, 0.25)) < 1e-5


@interpret
@pytest.mark.parametrize("cfg", ["small", "large"])
@pytest.mark.parametrize("one_program", [True, False])
@pytest.mark.parametrize("h,inter", [(128, 32), (40, 24)])
def test_interp_fused_moe(monkeypatch, cfg, one_program, h, inter):
    if not one_program:
        monkeypatch.setattr(moe_mod, "MOE_ONE_PROGRAM_ALIGN_MAX", 0)
    config = moe_mod.MOE_CONFIG_SMALL if cfg == "small" else moe_mod.MOE_CONFIG_LARGE
    n, e, k = 37, 6, 2
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, h, generator=g)
    w13, w2 = moe_weights(e, h, inter)
    ids, wts = routing(n, e, k, id_dtype=torch.int32)
    out = torch.full_like(x, float("nan"))
    moe_mod._fused_moe_triton(x, w13, w2, ids, wts, config=config, out=out)
    assert rel_err(out, fused_moe_ref(x, w13, w2, ids, wts)) < 1e-5


@interpret
def test_interp_fused_moe_fp16_in_fp32_out():
    x = torch.randn(9, 64).half()
    w13, w2 = moe_weights(16, 64, 32, dtype=torch.float16)
    ids, wts = routing(9, 16, 4)
    out = fused_moe(x, w13, w2, ids, wts, out_dtype=torch.float32)  # the Triton path on CUDA only
    out_t = moe_mod._fused_moe_triton(x, w13, w2, ids, wts, out=torch.empty(9, 64))
    assert out.dtype == out_t.dtype == torch.float32
    assert rel_err(out_t, out) < 2e-3  # the kernel rounds the activation to fp16, the reference does not


@interpret
def test_interp_fused_moe_one_token_many_experts_fp16():
    x = torch.randn(1, 64).half()
    w13, w2 = moe_weights(64, 64, 32, dtype=torch.float16)
    ids, wts = routing(1, 64, 8)
    out = moe_mod._fused_moe_triton(x, w13, w2, ids, wts)
    assert rel_err(out, fused_moe_ref(x, w13, w2, ids, wts)) < 2e-3


# ----------------------------------------------------------------------------------------------------------
# GPU: Triton kernels against the references on fresh random bf16 inputs
# ----------------------------------------------------------------------------------------------------------


def poison_allocator(nbytes=1 << 28):
    """Leave NaN bytes (0xFF) in the caching allocator's free blocks so unwritten buffers show up."""
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
    torch.cuda.synchronize()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("n", [1, 300])
def test_gpu_store_kv(n):
    torch.manual_seed(10 + n)
    kc = torch.randn(64, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    kr, vr = kc.clone(), vc.clone()
    slots = torch.randperm(64 * 16, device="cuda")[:n]
    slots[::7] = -1
    qkv = torch.randn(n, 40, 128, device="cuda", dtype=torch.bfloat16)
    k, v = qkv[:, 32:36], qkv[:, 36:40]
    store_kv(k, v, kc, vc, slots)
    store_kv_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def _gpu_batch(ctx_lens, q_lens, seed, hq=32, hkv=4, d=128, block_size=16, dtype=torch.bfloat16):
    return paged_batch(ctx_lens, q_lens, hq, hkv, d, block_size, dtype=dtype, device="cuda", seed=seed)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("ctx_lens", [[1, 100, 577, 0, 4100], [4096], [8192, 33], [300] * 128])
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_decode(ctx_lens, block_size):
    q, kc, vc, bt, cu, ctx = _gpu_batch(ctx_lens, [1] * len(ctx_lens), seed=len(ctx_lens) + block_size,
                                        block_size=block_size)
    ref = decode_attention_ref(q, kc, vc, bt, ctx, 128 ** -0.5)
    for splits in (None, 1, 7):
        out = torch.full_like(q, float("nan"))
        poison_allocator()
        attn_mod._decode_attention_triton(q, kc, vc, bt, ctx, 128 ** -0.5, num_splits=splits, out=out)
        assert rel_err(out, ref) < 1e-2, splits
        zero_rows = (ctx == 0).nonzero().flatten()
        assert (out[zero_rows] == 0).all()
    auto = attn_mod.decode_num_splits(len(ctx_lens), 4, bt.shape[1], block_size, q.device)
    if len(ctx_lens) <= 2:
        assert auto > 1  # the long, small-batch cases exercise the split-K path


@pytest.mark.gpu
@requires_gpu
def test_gpu_decode_fp32_and_small_heads():
    q, kc, vc, bt, cu, ctx = _gpu_batch([5, 900, 64], [1, 1, 1], seed=3, hq=6, hkv=2, d=64,
                                        dtype=torch.float32)
    out = decode_attention(q, kc, vc, bt, ctx, 0.125)
    assert rel_err(out, decode_attention_ref(q, kc, vc, bt, ctx, 0.125)) < 1e-4


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("cases", [
    [(2048, 2048), (1000, 300), (77, 1), (530, 17), (64, 64), (129, 129)],
    [(4096, 1024)] + [(300 + i, 1) for i in range(20)],
])
def test_gpu_prefill(cases):
    ctx_lens, q_lens = zip(*cases, strict=True)
    q, kc, vc, bt, cu, ctx = _gpu_batch(ctx_lens, q_lens, seed=len(cases))
    out = torch.full_like(q, float("nan"))
    poison_allocator()
    attn_mod._prefill_attention_triton(q, kc, vc, bt, cu, ctx, 128 ** -0.5, max(q_lens), out=out)
    ref = prefill_attention_ref(q, kc, vc, bt, cu, ctx, 128 ** -0.5)
    assert rel_err(out, ref) < 1e-2
    assert prefill_attention(q, kc, vc, bt, cu, ctx, 128 ** -0.5, max(q_lens)).shape == q.shape


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("n,e,k,h,inter", [
    (1, 128, 8, 2048, 768), (128, 128, 8, 2048, 768), (700, 128, 8, 2048, 768),  # Qwen3-30B-A3B
    (3, 20, 3, 200, 72), (513, 20, 3, 200, 72),  # odd sizes: masked K and N tiles
])
def test_gpu_fused_moe(n, e, k, h, inter):
    torch.manual_seed(n + e)
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    w13, w2 = moe_weights(e, h, inter, dtype=torch.bfloat16, device="cuda", seed=n)
    ids, wts = routing(n, e, k, seed=n, device="cuda", id_dtype=torch.int32 if n % 2 else torch.int64)
    out = torch.full_like(x, float("nan"))
    poison_allocator()
    moe_mod._fused_moe_triton(x, w13, w2, ids, wts, out=out)
    assert rel_err(out, fused_moe_ref(x, w13, w2, ids, wts)) < 1e-2
    again = fused_moe(x, w13, w2, ids, wts)
    assert torch.equal(again, out)  # deterministic despite atomics in the alignment


@pytest.mark.gpu
@requires_gpu
def test_gpu_fused_moe_fp32():
    x = torch.randn(9, 96, device="cuda")
    w13, w2 = moe_weights(10, 96, 48, device="cuda")
    ids, wts = routing(9, 10, 4, device="cuda")
    assert rel_err(fused_moe(x, w13, w2, ids, wts), fused_moe_ref(x, w13, w2, ids, wts)) < 1e-4


@pytest.mark.gpu
@requires_gpu
def test_gpu_cuda_graph_replay():
    """store_kv + decode_attention + fused_moe captured once, replayed on new inputs (padding rows too)."""
    B, hq, hkv, d, bs, max_blocks, E, K, H, inter = 8, 32, 4, 128, 16, 64, 128, 8, 2048, 768
    nblocks = B * max_blocks
    dev, dt = "cuda", torch.bfloat16
    kc = torch.randn(nblocks, bs, hkv, d, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    w13, w2 = moe_weights(E, H, inter, dtype=dt, device=dev)
    s_q = torch.zeros(B, hq, d, device=dev, dtype=dt)
    s_k = torch.zeros(B, hkv, d, device=dev, dtype=dt)
    s_v = torch.zeros_like(s_k)
    s_slots = torch.full((B,), -1, device=dev, dtype=torch.int64)
    s_bt = torch.zeros(B, max_blocks, device=dev, dtype=torch.int32)
    s_ctx = torch.zeros(B, device=dev, dtype=torch.int32)
    s_x = torch.zeros(B, H, device=dev, dtype=dt)
    s_ids = torch.zeros(B, K, device=dev, dtype=torch.int64)
    s_w = torch.zeros(B, K, device=dev, dtype=torch.float32)

    def step():
        store_kv(s_k, s_v, kc, vc, s_slots)
        return decode_attention(s_q, kc, vc, s_bt, s_ctx, d ** -0.5), fused_moe(s_x, w13, w2, s_ids, s_w)

    graph, (o_attn, o_moe) = capture_graph(step)

    for trial in range(3):
        torch.manual_seed(100 + trial)
        live = B - 2 - trial  # the last rows are padding: slot -1, context_len 0
        lens = torch.randint(1, max_blocks * bs, (B,))
        lens[live:] = 0
        perm = torch.randperm(nblocks).view(B, max_blocks).to(torch.int32)
        slots = torch.full((B,), -1, dtype=torch.int64)
        for b in range(live):
            p = int(lens[b]) - 1
            slots[b] = int(perm[b, p // bs]) * bs + p % bs
        s_q.copy_(torch.randn(B, hq, d, dtype=dt))
        s_k.copy_(torch.randn(B, hkv, d, dtype=dt))
        s_v.copy_(torch.randn(B, hkv, d, dtype=dt))
        s_slots.copy_(slots)
        s_bt.copy_(perm)
        s_ctx.copy_(lens.to(torch.int32))
        s_x.copy_(torch.randn(B, H, dtype=dt))
        ids, wts = routing(B, E, K, seed=trial)
        s_ids.copy_(ids)
        s_w.copy_(wts)
        k_ref, v_ref = kc.clone(), vc.clone()
        store_kv_ref(s_k, s_v, k_ref, v_ref, s_slots)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
        ref = decode_attention_ref(s_q, kc, vc, s_bt, s_ctx, d ** -0.5)
        assert rel_err(o_attn, ref) < 1e-2
        assert (o_attn[live:] == 0).all()
        assert rel_err(o_moe, fused_moe_ref(s_x, w13, w2, s_ids, s_w)) < 1e-2
