"""FP8 block-quantized kernels: references against independent float computations (CPU), the Triton kernels
under the interpreter (TRITON_INTERPRET=1 with triton installed), and on a GPU (marked ``gpu``).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from routereplay.kernels import HAS_TRITON
from routereplay.kernels import fp8 as fp8_mod
from routereplay.kernels import moe as moe_mod
from routereplay.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_block_weight,
    fp8_linear,
    fp8_linear_ref,
    fused_moe_fp8,
    fused_moe_fp8_ref,
    quantize_block_weight,
    quantize_per_token_group,
    quantize_per_token_group_ref,
)
from routereplay.kernels.moe import fused_moe_ref
from tests.helpers import capture_graph

BLOCK = (128, 128)

INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET, reason="interpreter tests need TRITON_INTERPRET=1 and triton")
requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA, triton")
_MMA_BITS: list[int | None] = [None]  # see fp8_mma_bits
if INTERPRET:
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as _interp

    # triton 3.6's interpreter holds scalars as 1-element arrays, which numpy >= 2.4 won't int().
    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

    # Its fp32 -> e4m3 cast rounds half up and drops the carry into the exponent (127.9 -> 64); the GPU's
    # cvt.rn rounds to nearest even, as torch does: cast through torch.
    _orig_fp_to_fp = _interp.InterpreterBuilder.create_fp_to_fp

    def _create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(FP8_DTYPE).view(torch.uint8).numpy()
            return _interp.TensorHandle(data, dst_type.scalar)
        return _orig_fp_to_fp(self, src, dst_type, rounding_mode)

    _interp.InterpreterBuilder.create_fp_to_fp = _create_fp_to_fp

    # Hopper's FP8 MMA does not add a K tile's products in fp32 (~14 bits are kept, DeepSeek-V3's report measured;
    # Triton's default on sm_90 never promotes within a tl.dot). `fp8_mma_bits(b)` makes the interpreter's fp8 dots
    # add the products one by one, truncating the partial sum to b fraction bits each time: a pessimistic model of
    # that accumulator, to measure what it does to the model (test_fp8's interpreter tests).
    _exact_dot = _interp.InterpreterBuilder.create_dot

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        bits = _MMA_BITS[0]
        if bits is None or not (a.dtype.primitive_bitwidth == 8 and a.dtype.is_floating()):
            return _exact_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        a64, b64 = (_interp._convert_float(t.data, t.dtype, tl.float16, None).view(np.float16).astype(np.float64)
                    for t in (a, b))
        acc = np.zeros((a64.shape[0], b64.shape[1]))
        for k in range(a64.shape[1]):  # e4m3 products and their partial sums are exact in float64
            mant, exp = np.frexp(acc + a64[:, k:k + 1] * b64[k:k + 1, :])
            acc = np.ldexp(np.trunc(mant * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), exp)
        return _interp.TensorHandle((acc + d.data).astype(d.data.dtype), d.dtype.scalar)

    _interp.InterpreterBuilder.create_dot = _create_dot


@contextlib.contextmanager
def fp8_mma_bits(bits: int | None):
    """Within: the interpreter's e4m3 dots accumulate as a ``bits``-fraction-bit MMA would (None: exact fp32)."""
    _MMA_BITS[0] = bits
    try:
        yield
    finally:
        _MMA_BITS[0] = None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def dumb_group_quant_dequant(x: torch.Tensor, group: int) -> torch.Tensor:
    """Column group by column group, independent of the reference's padding and reshapes."""
    out = torch.empty(x.shape, dtype=torch.float32)
    xf = x.float().cpu()
    for c0 in range(0, x.shape[-1], group):
        g = xf[..., c0:c0 + group]
        s = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / FP8_MAX
        out[..., c0:c0 + group] = (g / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s
    return out


def dumb_dequant(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bn, bk = block
    out = w.float().cpu().clone()
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            out[..., i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] *= s[..., i, j, None, None].cpu()
    return out


def fp8_weight(n: int, k: int, lead: tuple[int, ...] = (), block=BLOCK, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*lead, n, k, generator=g) / math.sqrt(k)
    # Block-varying magnitudes, so a wrong scale index shows up.
    w = w * torch.rand(*lead, n, 1, generator=g).add(0.5) * torch.rand(*lead, 1, k, generator=g).add(0.5)
    q, s = quantize_block_weight(w, block)
    return q.to(device), s.to(device)


def routing(n: int, e: int, k: int, seed: int = 0, device="cpu", id_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k)
    wts = torch.rand(n, k, generator=g)
    wts = wts / wts.sum(-1, keepdim=True)
    return ids.to(id_dtype).to(device), wts.float().to(device)


# ----------------------------------------------------------------------------------------------------------
# CPU: references
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((200, 130), (128, 128)),
                                         ((3, 70, 50), (32, 16)), ((1, 1), (128, 128))])
def test_block_weight_round_trip(shape, block):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    q, s = quantize_block_weight(w, block)
    n, k = shape[-2:]
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-2], math.ceil(n / block[0]), math.ceil(k / block[1]))
    d = dequantize_block_weight(q, s, block)
    assert torch.equal(d, dumb_dequant(q, s, block))
    # e4m3 keeps 3 mantissa bits: each element within half an ulp (2^-4 relative), and the block amax is
    # exactly representable (it maps to 448).
    assert ((d - w).abs() <= w.abs() * 2 ** -4 + s.max() * 2 ** -9).all()
    assert rel_err(d, w) < 0.03
    assert (q.float().abs().amax() == FP8_MAX)
    assert dequantize_block_weight(q, s, block, torch.bfloat16).dtype == torch.bfloat16


def test_block_weight_zero_block_is_finite():
    w = torch.zeros(256, 256)
    w[:128, :128] = torch.randn(128, 128)
    q, s = quantize_block_weight(w, BLOCK)
    assert (s > 0).all() and torch.isfinite(s).all()
    d = dequantize_block_weight(q, s, BLOCK)
    assert (d[128:] == 0).all() and (d[:, 128:] == 0).all()


def test_dequantize_refuses_wrong_scale_shape():
    q, s = quantize_block_weight(torch.randn(256, 200), BLOCK)
    with pytest.raises(ValueError, match="scale_inv"):
        dequantize_block_weight(q, s[:, :1], BLOCK)


def test_scale_is_the_fp32_quotient():
    # The kernels compute amax / 448 in fp32 with IEEE rounding; the reference goes through fp64 so that it
    # rounds the same on CUDA too (where torch divides by a Python scalar through its reciprocal).
    amax = torch.cat([torch.rand(100_000) * 500, torch.randn(100_000).bfloat16().float().abs(), torch.zeros(3)])
    assert torch.equal(fp8_mod._scale_of(amax), amax.clamp_min(1e-10) / torch.full_like(amax, FP8_MAX))


@pytest.mark.parametrize("m,k,group", [(5, 256, 128), (3, 200, 128), (0, 128, 128), (4, 48, 16)])
def test_per_token_group_quant(m, k, group):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3
    x[:, : min(k, group)] *= 40  # groups of very different magnitude in one row
    if m:
        x[-1] = 0  # an all-zero row: finite scale, zero output
    q, s = quantize_per_token_group(x, group)
    assert q.dtype == FP8_DTYPE and q.shape == (m, k)
    assert s.dtype == torch.float32 and s.shape == (m, math.ceil(k / group))
    assert torch.isfinite(s).all() and (s > 0).all()
    deq = q.float() * s.repeat_interleave(group, 1)[:, :k]
    assert torch.equal(deq, dumb_group_quant_dequant(x, group))
    if m:
        assert (q[-1].float() == 0).all()
        assert rel_err(deq, x) < 0.03


@pytest.mark.parametrize("m,n,k,block", [(7, 256, 384, (128, 128)), (5, 200, 300, (128, 128)),
                                         (1, 96, 64, (32, 16)), (0, 128, 128, (128, 128))])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_ref(m, n, k, block, bias):
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w, s = fp8_weight(n, k, block=block, seed=n)
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    expect = dumb_group_quant_dequant(x, block[1]).double() @ dumb_dequant(w, s, block).double().t()
    if bias:
        expect += b.double()
    full = fp8_linear_ref(x, w, s, block, b, out_dtype=torch.float32)
    assert full.dtype == torch.float32 and full.shape == (m, n)
    if m:
        assert rel_err(full, expect) < 1e-6
    out = fp8_linear(x, w, s, block, b)
    assert out.dtype == torch.bfloat16 and torch.equal(out, full.bfloat16())


def test_fp8_linear_leading_dims_and_zero_rows():
    w, s = fp8_weight(256, 256)
    x = torch.randn(2, 3, 256)
    x[1, 2] = 0
    out = fp8_linear(x, w, s, BLOCK)
    assert out.shape == (2, 3, 256) and torch.isfinite(out).all() and (out[1, 2] == 0).all()
    assert torch.equal(out.reshape(6, 256), fp8_linear(x.reshape(6, 256), w, s, BLOCK))
    # Against the unquantized product: the two e4m3 roundings cost a few percent.
    assert rel_err(out, x @ dequantize_block_weight(w, s, BLOCK).t()) < 0.06


def test_fp8_linear_refuses_bad_arguments():
    w, s = fp8_weight(256, 256)
    x = torch.randn(3, 256)
    with pytest.raises(ValueError, match="weight must be"):
        fp8_linear(x, w.float(), s, BLOCK)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        fp8_linear(x, w, s[:1], BLOCK)
    with pytest.raises(ValueError, match="last dim"):
        fp8_linear(x[:, :128], w, s, BLOCK)
    with pytest.raises(ValueError, match="bias"):
        fp8_linear(x, w, s, BLOCK, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="block"):
        fp8_linear(x, w, s, (0, 128))


def dumb_moe_fp8(x, w13, w2, ids, wts, s13, s2, block):
    """Pair by pair in float64, quantizing with the test's own group quantization."""
    inter = w13.shape[1] // 2
    xd = dumb_group_quant_dequant(x, block[1]).double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            gu = dumb_dequant(w13[e], s13[e], block).double() @ xd[n]
            act = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
            act = dumb_group_quant_dequant(act.float()[None], block[1])[0].double()
            out[n] += float(wts[n, j]) * (dumb_dequant(w2[e], s2[e], block).double() @ act)
    return out


def moe_fp8_weights(e: int, h: int, inter: int, block=BLOCK, seed: int = 0, device="cpu"):
    w13, s13 = fp8_weight(2 * inter, h, (e,), block, seed, device)
    w2, s2 = fp8_weight(h, inter, (e,), block, seed + 1, device)
    return w13, w2, s13, s2


@pytest.mark.parametrize("n,e,k,h,inter,block", [
    (5, 8, 2, 256, 128, (128, 128)),
    (9, 6, 3, 200, 72, (128, 128)),  # partial blocks on both GEMMs
    (4, 16, 4, 64, 48, (32, 16)),  # 12 of 16 experts at most: some are empty
    (0, 8, 2, 128, 128, (128, 128)),
])
def test_fused_moe_fp8_ref(n, e, k, h, inter, block):
    g = torch.Generator().manual_seed(n + e)
    x = torch.randn(n, h, generator=g).bfloat16()
    if n:
        x[0] = 0
    w13, w2, s13, s2 = moe_fp8_weights(e, h, inter, block, seed=e)
    ids, wts = routing(n, e, k, seed=n)
    full = fused_moe_fp8_ref(x, w13, w2, ids, wts, s13, s2, block, out_dtype=torch.float32)
    assert full.shape == (n, h) and full.dtype == torch.float32
    out = fused_moe_fp8(x, w13, w2, ids, wts, s13, s2, block)
    assert out.dtype == torch.bfloat16 and torch.equal(out, full.bfloat16())
    if not n:
        return
    assert (full[0] == 0).all()
    assert rel_err(full, dumb_moe_fp8(x, w13, w2, ids, wts, s13, s2, block)) < 1e-5
    # The bf16 MoE on the dequantized weights and quant-dequantized x differs only by the act's rounding.
    loose = fused_moe_ref(dumb_group_quant_dequant(x, block[1]), dequantize_block_weight(w13, s13, block),
                          dequantize_block_weight(w2, s2, block), ids, wts, out_dtype=torch.float32)
    assert rel_err(full, loose) < 0.05


def test_fused_moe_fp8_refuses_bad_arguments():
    w13, w2, s13, s2 = moe_fp8_weights(4, 256, 64)
    x = torch.randn(3, 256)
    ids, wts = routing(3, 4, 2)
    with pytest.raises(ValueError, match="w2_scale_inv"):
        fused_moe_fp8(x, w13, w2, ids, wts, s13, s13, BLOCK)
    with pytest.raises(ValueError, match="w13 must be"):
        fused_moe_fp8(x, w13.float(), w2, ids, wts, s13, s2, BLOCK)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe_fp8(x, w13, w2[:, :128], ids, wts, s13, s2, BLOCK)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe_fp8(x, w13, w2, ids[:2], wts, s13, s2, BLOCK)


# ----------------------------------------------------------------------------------------------------------
# Triton under the interpreter (CPU)
# ----------------------------------------------------------------------------------------------------------


@interpret
@pytest.mark.parametrize("m,k,group", [(5, 384, 128), (3, 200, 128), (2, 4096, 128), (4, 50, 16)])
def test_interp_group_quant_is_bitwise_the_reference(m, k, group):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).bfloat16() * 5
    x[0] = 0
    q, s = fp8_mod._quantize_per_token_group_triton(x, group)
    q_ref, s_ref = quantize_per_token_group_ref(x, group)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


LINEAR_SHAPES = [(1, 96, 256, (128, 128)), (7, 200, 300, (128, 128)), (33, 130, 256, (64, 64)),
                 (20, 64, 96, (128, 32))]


@interpret
@pytest.mark.parametrize("m,n,k,block", LINEAR_SHAPES)
@pytest.mark.parametrize("cfg", ["decode", "medium"])
def test_interp_fp8_linear(m, n, k, block, cfg):
    config = fp8_mod.LINEAR_CONFIG_DECODE if cfg == "decode" else fp8_mod.LINEAR_CONFIG_MEDIUM
    g = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w, s = fp8_weight(n, k, block=block, seed=m)
    b = torch.randn(n, generator=g)
    out = fp8_mod._fp8_linear_triton(x, w, s, block, b, torch.float32, config=config)
    # Same quantized operands; only the order of the fp32 sums differs (per K tile, then scaled).
    assert rel_err(out, fp8_linear_ref(x, w, s, block, b, out_dtype=torch.float32)) < 1e-6
    out_bf16 = fp8_mod._fp8_linear_triton(x, w, s, block, config=config)
    assert out_bf16.dtype == torch.bfloat16
    assert rel_err(out_bf16, fp8_linear_ref(x, w, s, block)) < 1e-2


@interpret
@pytest.mark.parametrize("cfg", ["small", "large"])
@pytest.mark.parametrize("one_program", [True, False])
@pytest.mark.parametrize("h,inter,block", [(256, 128, (128, 128)), (200, 72, (128, 128)), (96, 80, (32, 32))])
def test_interp_fused_moe_fp8(monkeypatch, cfg, one_program, h, inter, block):
    if not one_program:
        monkeypatch.setattr(moe_mod, "MOE_ONE_PROGRAM_ALIGN_MAX", 0)
    config = fp8_mod.FP8_MOE_CONFIG_SMALL if cfg == "small" else fp8_mod.FP8_MOE_CONFIG_LARGE
    n, e, k = 9, 16, 3
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(h)).bfloat16()
    x[2] = 0
    w13, w2, s13, s2 = moe_fp8_weights(e, h, inter, block, seed=h)
    ids, wts = routing(n, e, k, seed=inter)
    out = fp8_mod._fused_moe_fp8_triton(x, w13, w2, ids, wts, s13, s2, block, config=config,
                                        out=torch.empty(n, h))
    ref = fused_moe_fp8_ref(x, w13, w2, ids, wts, s13, s2, block, out_dtype=torch.float32)
    # The activation is requantized from sums in another order: an element on a rounding boundary may land
    # one e4m3 step away (6% of that element), so the bound is looser than the linear's.
    assert rel_err(out, ref) < 2e-3
    assert (out[2] == 0).all()


# The tiny FP8 checkpoints' GEMMs (tiny.FP8_BLOCK, hidden 64): deepseek_v3's MLA projections (q_a 24 x 64, q_b 96 x 24
# with K below one K tile, kv_a 40 x 64 with a partial N block, kv_b 128 x 32 fed a strided view), the attention and MLP
# ones, and the routed experts (8, top-2, I = 64); at 1, 2 and 37 rows (the model tests' prompt).
TINY_BLOCK = (16, 32)
TINY_LINEARS = [(24, 64), (96, 24), (40, 64), (128, 32), (64, 64), (32, 64), (128, 64), (64, 128)]


@interpret
@pytest.mark.parametrize("m", [1, 2, 37])
@pytest.mark.parametrize("n,k", TINY_LINEARS)
def test_interp_fp8_linear_at_the_tiny_checkpoint_shapes(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x = (torch.randn(m, k + 8, generator=g) * torch.rand(k + 8, generator=g).add(0.1) * 3)[:, :k]  # row stride k + 8
    w, s = fp8_weight(n, k, block=TINY_BLOCK, seed=n + k)
    out = fp8_mod._fp8_linear_triton(x, w, s, TINY_BLOCK, None, torch.float32)
    ref = fp8_linear_ref(x, w, s, TINY_BLOCK, out_dtype=torch.float32)
    # Same quantized operands, fp32 sums in another order: each element within a few fp32 ulps of its terms' sum.
    terms = dumb_group_quant_dequant(x, TINY_BLOCK[1]).abs() @ dumb_dequant(w, s, TINY_BLOCK).abs().t()
    assert ((out - ref).abs() <= 2.0 ** -15 * terms).all()


@interpret
@pytest.mark.parametrize("m", [1, 2, 37])
def test_interp_fused_moe_fp8_at_the_tiny_checkpoint_shapes(m):
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m))
    w13, w2, s13, s2 = moe_fp8_weights(8, 64, 64, TINY_BLOCK, seed=m)
    ids, wts = routing(m, 8, 2, seed=m)
    out = fp8_mod._fused_moe_fp8_triton(x, w13, w2, ids, wts, s13, s2, TINY_BLOCK, out=torch.empty(m, 64))
    ref = fused_moe_fp8_ref(x, w13, w2, ids, wts, s13, s2, TINY_BLOCK, out_dtype=torch.float32)
    # No activation of these seeds lies within fp32 noise of an e4m3 tie, so only the sums' order differs (a flip
    # would cost ~1e-3).
    assert rel_err(out, ref) < 1e-5


@interpret
def test_interp_kernels_refuse_a_non_power_of_two_group():
    w, s = fp8_weight(64, 96, block=(64, 96))
    with pytest.raises(ValueError, match=r"block\[1\]"):
        fp8_mod._fp8_linear_triton(torch.randn(2, 96), w, s, (64, 96))


# ----------------------------------------------------------------------------------------------------------
# GPU (the references run on CPU copies, as the bounds below were measured on an H200: a reference on CUDA
# rests on torch's CUDA division rounding like the kernels' div_rn)
# ----------------------------------------------------------------------------------------------------------


def cpu(*ts):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("k", [2048, 200])
def test_gpu_group_quant_is_bitwise_the_reference(m, k):
    x = (torch.randn(m, k, device="cuda") * 3).bfloat16()
    x[m // 2] = 0
    q, s = quantize_per_token_group(x, 128)
    q_ref, s_ref = quantize_per_token_group_ref(x.cpu(), 128)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 2, 37])
@pytest.mark.parametrize("k", [64, 24])
def test_gpu_group_quant_of_the_tiny_checkpoints_is_bitwise_the_reference(m, k):
    """fp32 activations in groups of 32 (tiny.FP8_BLOCK), a strided view as MLA's kv_b_proj gets."""
    x = (torch.randn(m, k + 8, device="cuda") * 3)[:, :k]
    x[m // 2] = 0
    q, s = quantize_per_token_group(x, TINY_BLOCK[1])
    q_ref, s_ref = quantize_per_token_group_ref(x.cpu(), TINY_BLOCK[1])
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("n,k,block", [(4096, 2048, (128, 128)), (2048, 512, (128, 128)),
                                       (200, 300, (128, 128)), (96, 192, (64, 64)),
                                       (40, 64, TINY_BLOCK), (96, 24, TINY_BLOCK), (128, 32, TINY_BLOCK)])
def test_gpu_fp8_linear(m, n, k, block):
    torch.manual_seed(m + n)
    x = torch.randn(m, k, device="cuda").bfloat16()
    w, s = fp8_weight(n, k, block=block, seed=m, device="cuda")
    b = torch.randn(n, device="cuda").bfloat16() if m % 2 else None
    ref = fp8_linear_ref(*cpu(x, w, s), block, None if b is None else b.cpu(), out_dtype=torch.float32)
    full = fp8_linear(x, w, s, block, b, out_dtype=torch.float32)
    # Same quantized operands; Hopper's FP8 MMA accumulates a K tile (128) in reduced precision before the
    # fp32 accumulator takes it: ~1e-4 relative.
    assert rel_err(full, ref) < 2e-3
    out = fp8_linear(x, w, s, block, b)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    assert torch.equal(out, full.bfloat16())  # the same sums, rounded once
    assert torch.equal(fp8_linear(x, w, s, block, b), out)  # deterministic


@pytest.mark.gpu
@requires_gpu
def test_gpu_fp8_linear_leading_dims_zero_rows_and_m0():
    w, s = fp8_weight(256, 512, device="cuda")
    x = torch.randn(2, 3, 512, device="cuda").bfloat16()
    x[1, 1] = 0
    out = fp8_linear(x, w, s, BLOCK)
    assert out.shape == (2, 3, 256) and (out[1, 1] == 0).all()
    assert torch.equal(out.reshape(6, 256), fp8_linear(x.reshape(6, 512), w, s, BLOCK))
    assert fp8_linear(x[:0, 0], w, s, BLOCK).shape == (0, 256)


MOE_CASES = [
    (1, 128, 8, 2048, 768), (7, 128, 8, 2048, 768), (64, 128, 8, 2048, 768),  # Qwen3-30B-A3B, small tiles
    (300, 128, 8, 2048, 768), (600, 128, 8, 2048, 768),  # large tiles; 4800 pairs: two-kernel alignment
    (3, 20, 3, 200, 72), (513, 20, 3, 200, 72),  # partial blocks on both GEMMs
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("n,e,k,h,inter", MOE_CASES)
def test_gpu_fused_moe_fp8(n, e, k, h, inter):
    torch.manual_seed(n + e)
    x = torch.randn(n, h, device="cuda").bfloat16()
    x[0] = 0
    w13, w2, s13, s2 = moe_fp8_weights(e, h, inter, seed=n, device="cuda")
    ids, wts = routing(n, e, k, seed=n, device="cuda", id_dtype=torch.int32 if n % 2 else torch.int64)
    out = torch.full_like(x, float("nan"))
    fp8_mod._fused_moe_fp8_triton(x, w13, w2, ids, wts, s13, s2, BLOCK, out=out)
    ref = fused_moe_fp8_ref(*cpu(x, w13, w2, ids, wts, s13, s2), BLOCK, out_dtype=torch.float32)
    # The down GEMM's input is requantized from sums the MMA rounded differently: an element on a rounding
    # boundary lands one e4m3 step (6%) away, which costs ~1e-3 relative over the output.
    assert rel_err(out, ref) < 1e-2
    assert (out[0] == 0).all()
    assert torch.equal(fused_moe_fp8(x, w13, w2, ids, wts, s13, s2, BLOCK), out)  # deterministic
    full = fused_moe_fp8(x, w13, w2, ids, wts, s13, s2, BLOCK, out_dtype=torch.float32)
    assert torch.equal(full.bfloat16(), out)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("n", [1, 2, 37, 300])
def test_gpu_fused_moe_fp8_at_the_tiny_checkpoint_shapes(n):
    """8 experts, top-2, H = I = 64 in blocks of (16, 32); fp32 activations; 300 tokens take the large tiles."""
    torch.manual_seed(n)
    x = torch.randn(n, 64, device="cuda")
    w13, w2, s13, s2 = moe_fp8_weights(8, 64, 64, TINY_BLOCK, seed=n, device="cuda")
    ids, wts = routing(n, 8, 2, seed=n, device="cuda")
    out = fused_moe_fp8(x, w13, w2, ids, wts, s13, s2, TINY_BLOCK)
    ref = fused_moe_fp8_ref(*cpu(x, w13, w2, ids, wts, s13, s2), TINY_BLOCK)
    assert rel_err(out, ref) < 1e-2  # as test_gpu_fused_moe_fp8 (requantization flips)


@pytest.mark.gpu
@requires_gpu
def test_gpu_fp8_cuda_graph_replay():
    """fp8_linear + fused_moe_fp8 captured once, replayed on new inputs, equal to eager calls."""
    B, E, K, H, inter = 8, 128, 8, 2048, 768
    w, s = fp8_weight(4096, H, device="cuda")
    w13, w2, s13, s2 = moe_fp8_weights(E, H, inter, device="cuda")
    s_x = torch.zeros(B, H, device="cuda", dtype=torch.bfloat16)
    s_ids = torch.zeros(B, K, device="cuda", dtype=torch.int64)
    s_w = torch.zeros(B, K, device="cuda")

    def step():
        return fp8_linear(s_x, w, s, BLOCK), fused_moe_fp8(s_x, w13, w2, s_ids, s_w, s13, s2, BLOCK)

    graph, (o_lin, o_moe) = capture_graph(step)
    for seed in range(3):
        torch.manual_seed(seed)
        s_x.copy_(torch.randn(B, H, device="cuda"))
        ids, wts = routing(B, E, K, seed=seed, device="cuda")
        s_ids.copy_(ids)
        s_w.copy_(wts)
        graph.replay()
        e_lin, e_moe = step()
        assert torch.equal(o_lin, e_lin) and torch.equal(o_moe, e_moe)
