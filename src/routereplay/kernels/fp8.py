"""FP8 (e4m3) block-quantized linear and fused-MoE compute: Triton kernels (CUDA) beside PyTorch references.

Layout of the checkpoints that ship FP8 weights (DeepSeek-V3, Qwen3-*-FP8, GLM-4.5-FP8): a weight
``w [N, K]`` is float8_e4m3fn with a per-block fp32 ``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``
(``block = (bn, bk)``, weight_block_size, usually (128, 128)); the real weight is ``w * scale_inv`` over
each block. Activations are quantized on the fly per token per group of ``bk`` columns to e4m3 with
the scale ``amax / 448`` (amax clamped to ``FP8_EPS``, so an all-zero group gives zeros, never NaN).
The matmul is then ``sum_kblocks (a_q @ w_q^T) * a_scale * w_scale`` with fp32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_EPS = 1e-10  # amax floor: an all-zero group or block still gets a finite, non-zero scale


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    bn, bk = (int(b) for b in block)
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block must be two positive sizes (block_n, block_k), got {block}")
    return bn, bk


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _expand_blocks(scale: torch.Tensor, block: tuple[int, int], n: int, k: int) -> torch.Tensor:
    """Per-block scales [..., ceil(n/bn), ceil(k/bk)] -> per-element [..., n, k]."""
    bn, bk = block
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Division (not a reciprocal multiply) so the kernels, which divide with IEEE rounding, match bitwise.
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# ----------------------------------------------------------------------------------------------------------
# References (the CPU path of the engine; also what the Triton kernels are tested against)
# ----------------------------------------------------------------------------------------------------------


def quantize_block_weight(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[..., N, K]`` -> (e4m3 ``[..., N, K]``, fp32 scale_inv ``[..., ceil(N/bn), ceil(K/bk)]``).

    Scale = block amax / 448, as the FP8 checkpoints are made; a partial last block is its own block.
    """
    bn, bk = _check_block(block)
    if w.dim() < 2:
        raise ValueError(f"w must be [..., N, K], got shape {tuple(w.shape)}")
    *lead, n, k = w.shape
    nb, kb = _cdiv(n, bn), _cdiv(k, bk)
    wf = w.float()
    padded = F.pad(wf.abs(), (0, kb * bk - k, 0, nb * bn - n))  # zeros never raise an amax
    amax = padded.reshape(*lead, nb, bn, kb, bk).amax(dim=(-3, -1))
    scale = amax.clamp_min(FP8_EPS) / FP8_MAX
    return _quantize(wf, _expand_blocks(scale, (bn, bk), n, k)), scale


def dequantize_block_weight(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 ``[..., N, K]`` with its block scales -> the real weight in ``dtype``."""
    bn, bk = _check_block(block)
    n, k = w.shape[-2:]
    want = (*w.shape[:-2], _cdiv(n, bn), _cdiv(k, bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv must be {want} for a weight {tuple(w.shape)} and block {block}, "
                         f"got {tuple(scale_inv.shape)}")
    return (w.float() * _expand_blocks(scale_inv.float(), (bn, bk), n, k)).to(dtype)


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> (e4m3 ``[..., K]``, fp32 scales ``[..., ceil(K/group)]``); a partial last group is a group."""
    if group <= 0:
        raise ValueError(f"group must be positive, got {group}")
    k = x.shape[-1]
    g = _cdiv(k, group)
    xf = x.float()
    amax = F.pad(xf.abs(), (0, g * group - k)).reshape(*x.shape[:-1], g, group).amax(dim=-1)
    scale = amax.clamp_min(FP8_EPS) / FP8_MAX
    return _quantize(xf, scale.repeat_interleave(group, dim=-1)[..., :k]), scale


def _quant_dequant(x: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernels multiply: x rounded through its per-token-group e4m3 quantization, in fp32."""
    q, s = quantize_per_token_group(x, group)
    return q.float() * s.repeat_interleave(group, dim=-1)[..., : x.shape[-1]]


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   block: tuple[int, int], bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(weight [N, K])^T (+ bias)`` with x quantized per token group of ``block[1]``.

    Accumulates in fp32 and rounds once to ``out_dtype`` (default: x's dtype).
    """
    _check_linear(x, weight, weight_scale_inv, block, bias)
    out = _quant_dequant(x, block[1]) @ dequantize_block_weight(weight, weight_scale_inv, block).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


def fused_moe_fp8_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor, w13_scale_inv: torch.Tensor, w2_scale_inv: torch.Tensor,
                      block: tuple[int, int], out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Routed SwiGLU experts with e4m3 weights (layout of ``kernels.moe.fused_moe``).

    Both GEMMs' activations are quantized per token group of ``block[1]``: x before gate/up, and the fp32
    ``silu(gate) * up`` before down (the kernel quantizes it in registers, never rounding it to bf16 first).
    """
    _check_moe(x, w13, w2, topk_ids, topk_weights, w13_scale_inv, w2_scale_inv, block)
    N, H = x.shape
    K = topk_ids.shape[1]
    E, I2, _ = w13.shape
    inter = I2 // 2
    out = torch.zeros(N, H, dtype=torch.float32, device=x.device)
    if N == 0:
        return out.to(out_dtype or x.dtype)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    tokens = order // K
    weights = topk_weights.reshape(-1)[order].float()
    counts = torch.bincount(flat, minlength=E).tolist()
    xd = _quant_dequant(x, block[1])
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        start += c
        t = tokens[sl]
        gate_up = xd[t] @ dequantize_block_weight(w13[e], w13_scale_inv[e], block).t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = _quant_dequant(act, block[1]) @ dequantize_block_weight(w2[e], w2_scale_inv[e], block).t()
        out.index_add_(0, t, y * weights[sl, None])
    return out.to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Argument checks (shared by both paths: a wrong layout fails the same way on CPU and GPU)
# ----------------------------------------------------------------------------------------------------------


def _check_fp8_weight(name: str, w: torch.Tensor, scale: torch.Tensor, scale_name: str,
                      block: tuple[int, int]) -> None:
    if w.dtype != FP8_DTYPE:
        raise ValueError(f"{name} must be {FP8_DTYPE}, got {w.dtype}")
    bn, bk = block
    n, k = w.shape[-2:]
    want = (*w.shape[:-2], _cdiv(n, bn), _cdiv(k, bk))
    if tuple(scale.shape) != want:
        raise ValueError(f"{scale_name} must be {want} for {name} {tuple(w.shape)} and block {tuple(block)}, "
                         f"got {tuple(scale.shape)}")


def _check_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                  block: tuple[int, int], bias: torch.Tensor | None) -> None:
    block = _check_block(block)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    _check_fp8_weight("weight", weight, weight_scale_inv, "weight_scale_inv", block)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal weight's K ({weight.shape[1]})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor, w13_scale_inv: torch.Tensor, w2_scale_inv: torch.Tensor,
               block: tuple[int, int]) -> None:
    block = _check_block(block)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got shape {tuple(x.shape)}")
    N, H = x.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2:
        raise ValueError(f"w13 must be [E, 2I, {H}], got {tuple(w13.shape)}")
    E, I2, _ = w13.shape
    if tuple(w2.shape) != (E, H, I2 // 2):
        raise ValueError(f"w2 must be {(E, H, I2 // 2)} for w13 {tuple(w13.shape)}, got {tuple(w2.shape)}")
    _check_fp8_weight("w13", w13, w13_scale_inv, "w13_scale_inv", block)
    _check_fp8_weight("w2", w2, w2_scale_inv, "w2_scale_inv", block)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids and topk_weights must both be [{N}, K], got {tuple(topk_ids.shape)} and "
                         f"{tuple(topk_weights.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [..., K]`` times a block-quantized e4m3 ``weight [N, K]`` -> ``[..., N]`` in ``out_dtype``
    (default x's dtype; torch.float32 gives the unrounded product, for tensor-parallel partial sums)."""
    return fp8_linear_ref(x, weight, weight_scale_inv, block, bias, out_dtype)


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, w13_scale_inv: torch.Tensor, w2_scale_inv: torch.Tensor,
                  block: tuple[int, int], out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``kernels.moe.fused_moe`` with e4m3 block-quantized experts; the top-k sum is fp32, rounded once."""
    return fused_moe_fp8_ref(x, w13, w2, topk_ids, topk_weights, w13_scale_inv, w2_scale_inv, block, out_dtype)
