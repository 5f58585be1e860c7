"""FP8 block-quantized kernels: references against independent float computations (CPU), the Triton kernels
under the interpreter (TRITON_INTERPRET=1 with triton installed), and on a GPU (marked ``gpu``).
"""

from __future__ import annotations

import math

import pytest
import torch

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
)
from routereplay.kernels.moe import fused_moe_ref

BLOCK = (128, 128)


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
