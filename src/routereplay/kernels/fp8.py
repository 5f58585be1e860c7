"""FP8 (e4m3) block-quantized linear and fused-MoE compute: Triton kernels (CUDA) beside PyTorch references.

Layout of the checkpoints that ship FP8 weights (DeepSeek-V3, Qwen3-*-FP8, GLM-4.5-FP8): a weight
``w [N, K]`` is float8_e4m3fn with a per-block fp32 ``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``
(``block = (bn, bk)``, weight_block_size, usually (128, 128)); the real weight is ``w * scale_inv`` over
each block. Activations are quantized on the fly per token per group of ``bk`` columns to e4m3 with
the scale ``amax / 448`` (amax clamped to ``FP8_EPS``, so an all-zero group gives zeros, never NaN).
The matmul is then ``sum_kblocks (a_q @ w_q^T) * a_scale * w_scale`` with fp32 accumulation.

CUDA path (Hopper FP8 tensor cores; no host sync, CUDA-graph capturable, every buffer size a function of
shapes only): a per-token-group quantization kernel, a block-scaled w8a8 GEMM (``tl.dot`` on e4m3 tiles, one
scale product per K tile, so BLOCK_K divides ``block[1]``), and the fused MoE of ``kernels.moe`` (same
alignment kernels, same determinism argument) with e4m3 gate/up and down GEMMs; the gate/up kernel's
N tile is one activation group, so it quantizes ``silu(gate) * up`` in registers for the down GEMM.
Quantization divides with IEEE rounding (``div_rn``) like the CPU reference, so both quantize bitwise alike.
On sm_90 the FP8 MMA adds a ``tl.dot``'s products in reduced precision (Triton never promotes within a dot; one dot
here is one K tile): results differ from the references by ~1e-4 relative, and an activation requantized near an
e4m3 rounding tie may land one step away. A model is therefore compared with its CPU path op by op, not by its
logits, which such flips move chaotically (tests/test_fp8.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from routereplay.kernels import moe as _moe
from routereplay.kernels.attention import HAS_TRITON, _next_pow2, _use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from routereplay.kernels.moe import _block_expert

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_EPS = 1e-10  # amax floor: an all-zero group or block still gets a finite, non-zero scale

# Tile configurations, by batch rows (a host-side shape fact); module level so the benchmark can sweep them.
# block_k is capped by the quantization group (block[1]) so one K tile never straddles two scales.
LINEAR_CONFIG_DECODE = dict(block_m=16, block_n=32, block_k=128, group_m=1, num_warps=4, num_stages=4)
LINEAR_CONFIG_MEDIUM = dict(block_m=64, block_n=64, block_k=128, group_m=8, num_warps=4, num_stages=4)
LINEAR_CONFIG_LARGE = dict(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=8, num_stages=3)
LINEAR_DECODE_MAX_M = 16
LINEAR_MEDIUM_MAX_M = 256
# MoE: the gate/up N tile is always one activation group (block[1]), so it has no block_n here.
FP8_MOE_CONFIG_SMALL = dict(block_m=16, gu_block_k=128, down_block_n=64, down_block_k=128,
                            num_warps=4, num_stages=4)
FP8_MOE_CONFIG_LARGE = dict(block_m=64, gu_block_k=128, down_block_n=128, down_block_k=128,
                            num_warps=8, num_stages=3)
QUANT_BLOCK = 2048  # elements of one row a quantization program handles (whole groups)


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


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    """``max(amax, eps) / 448`` rounded once to fp32 on any device: CUDA torch divides by a Python scalar
    through its reciprocal, and with bf16 inputs x/scale lands exactly on an e4m3 tie often (0.15% of
    elements), so a one-ulp scale flips those roundings. The fp64 quotient rounds to the fp32 one."""
    return (amax.clamp_min(FP8_EPS).double() / FP8_MAX).float()


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
    scale = _scale_of(amax)
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


def quantize_per_token_group_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> (e4m3 ``[..., K]``, fp32 scales ``[..., ceil(K/group)]``); a partial last group is a group."""
    _check_group(group)
    k = x.shape[-1]
    g = _cdiv(k, group)
    xf = x.float()
    amax = F.pad(xf.abs(), (0, g * group - k)).reshape(*x.shape[:-1], g, group).amax(dim=-1)
    scale = _scale_of(amax)
    return _quantize(xf, scale.repeat_interleave(group, dim=-1)[..., :k]), scale


def _quant_dequant(x: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernels multiply: x rounded through its per-token-group e4m3 quantization, in fp32."""
    q, s = quantize_per_token_group_ref(x, group)
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


def _check_group(group: int) -> None:
    if group <= 0:
        raise ValueError(f"group must be positive, got {group}")


def _check_kernel_block(block: tuple[int, int]) -> None:
    """The Triton path tiles K (and the MoE activation groups) by block[1]: it must be a power of two."""
    bk = int(block[1])
    if bk < 32 or bk & (bk - 1):
        raise ValueError(f"block[1] (the K block and activation group) must be a power of two >= 32 for the "
                         f"Triton kernels, got block {tuple(block)}")


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
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if HAS_TRITON:
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _FP8_EPS = tl.constexpr(FP8_EPS)

    @triton.jit
    def _quantize_rows(x):
        """Row-wise quantization of an fp32 tile, as quantize_per_token_group_ref rounds: (x/scale, scale)."""
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), _FP8_EPS), _FP8_MAX)
        return tl.clamp(tl.math.div_rn(x, scale[:, None]), -_FP8_MAX, _FP8_MAX), scale

    @triton.jit
    def _group_quant_kernel(x_ptr, q_ptr, s_ptr, K, num_groups, stride_xm, stride_qm, stride_sm,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUPS: tl.constexpr):
        # One program: GROUPS consecutive groups of one row, as a [GROUPS, GROUP_PAD] tile.
        m = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        c = tl.arange(0, GROUP_PAD)
        cols = g[:, None] * GROUP + c[None, :]
        mask = (c[None, :] < GROUP) & (cols < K)
        x = tl.load(x_ptr + m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        q, scale = _quantize_rows(x)
        tl.store(q_ptr + m * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + m * stride_sm + g, scale, mask=g < num_groups)

    @triton.jit(do_not_specialize=["M"])
    def _w8a8_block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                                stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                                SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        # Row tiles are visited GROUP_M at a time per column tile, so a weight tile is reused from L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // width) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_size
        pid_n = (pid % width) // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major
        as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
        bs_ptrs = bs_ptr + (offs_n // SCALE_N) * stride_bsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < K - k0
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            a_s = tl.load(as_ptrs + k0 // SCALE_K, mask=m_mask, other=0.0)
            b_s = tl.load(bs_ptrs + k0 // SCALE_K, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _moe_fp8_gate_up_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, act_ptr, acts_ptr, pairs_ptr, counts_ptr,
                                H, inter, E, stride_xn, stride_xsn, stride_we, stride_wn, stride_wse,
                                stride_wsn, stride_an, stride_asn,
                                TOPK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                                GROUP: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_N: tl.constexpr,
                                EVEN_K: tl.constexpr):
        # kernels.moe's gate/up kernel with e4m3 tiles; the N tile is one activation group (GROUP columns,
        # also the K block of the scales), so its output is quantized here for the down GEMM.
        row0 = tl.program_id(0) * BLOCK_M
        expert, start, count = _block_expert(counts_ptr, E, row0, E_PAD, BLOCK_M)
        if expert >= E:
            return
        rows = row0 + tl.arange(0, BLOCK_M)
        valid = rows - start < count
        pair = tl.load(pairs_ptr + rows, mask=valid, other=0)
        tok = (pair // TOPK).to(tl.int64)
        offs_n = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        n_mask = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = xq_ptr + tok[:, None] * stride_xn + offs_k[None, :]
        w_e = w_ptr + expert.to(tl.int64) * stride_we
        g_ptrs = w_e + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + inter * stride_wn
        xs_ptrs = xs_ptr + tok * stride_xsn
        ws_e = ws_ptr + expert.to(tl.int64) * stride_wse
        gs_ptrs = ws_e + (offs_n // SCALE_N) * stride_wsn
        us_ptrs = ws_e + ((offs_n + inter) // SCALE_N) * stride_wsn
        acc_g = tl.zeros([BLOCK_M, GROUP], tl.float32)
        acc_u = tl.zeros([BLOCK_M, GROUP], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
                wg = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)
                wu = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < H - k0
                a = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
                wg = tl.load(g_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
                wu = tl.load(u_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            kb = k0 // GROUP
            a_s = tl.load(xs_ptrs + kb, mask=valid, other=0.0)[:, None]
            acc_g += tl.dot(a, wg) * a_s * tl.load(gs_ptrs + kb, mask=n_mask, other=0.0)[None, :]
            acc_u += tl.dot(a, wu) * a_s * tl.load(us_ptrs + kb, mask=n_mask, other=0.0)[None, :]
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        # Masked columns and rows holding no pair are silu(0)*0 = 0: they never raise a group's amax, and the
        # down kernel may read those rows (zeros with a finite scale) safely.
        q, scale = _quantize_rows(acc_g * tl.sigmoid(acc_g) * acc_u)
        tl.store(act_ptr + rows[:, None].to(tl.int64) * stride_an + offs_n[None, :],
                 q.to(act_ptr.dtype.element_ty), mask=n_mask[None, :])
        tl.store(acts_ptr + rows.to(tl.int64) * stride_asn + tl.program_id(1), scale)

    @triton.jit
    def _moe_fp8_down_kernel(act_ptr, acts_ptr, w_ptr, ws_ptr, outp_ptr, pairs_ptr, counts_ptr, wts_ptr,
                             H, inter, E, stride_an, stride_asn, stride_we, stride_wn, stride_wse, stride_wsn,
                             stride_on, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                             EVEN_K: tl.constexpr):
        row0 = tl.program_id(0) * BLOCK_M
        expert, start, count = _block_expert(counts_ptr, E, row0, E_PAD, BLOCK_M)
        if expert >= E:
            return
        rows = row0 + tl.arange(0, BLOCK_M)
        valid = rows - start < count
        pair = tl.load(pairs_ptr + rows, mask=valid, other=0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_an + offs_k[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn \
            + offs_k[:, None]
        as_ptrs = acts_ptr + rows.to(tl.int64) * stride_asn
        ws_ptrs = ws_ptr + expert.to(tl.int64) * stride_wse + (offs_n // SCALE_N) * stride_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < inter - k0
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            kb = k0 // SCALE_K
            acc += tl.dot(a, w) * tl.load(as_ptrs + kb)[:, None] \
                * tl.load(ws_ptrs + kb, mask=n_mask, other=0.0)[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        rw = tl.load(wts_ptr + pair, mask=valid, other=0.0)
        tl.store(outp_ptr + pair[:, None].to(tl.int64) * stride_on + offs_n[None, :], acc * rw[:, None],
                 mask=valid[:, None] & n_mask[None, :])


def _quantize_per_token_group_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    num_groups = triton.cdiv(K, group)
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(M, num_groups, dtype=torch.float32, device=x.device)
    if M and K:
        group_pad = _next_pow2(group)
        groups = min(max(1, QUANT_BLOCK // group_pad), _next_pow2(num_groups))
        _group_quant_kernel[(M, triton.cdiv(num_groups, groups))](
            x2, q, s, K, num_groups, x2.stride(0), q.stride(0), s.stride(0),
            GROUP=group, GROUP_PAD=group_pad, GROUPS=groups, num_warps=4)
    return q.view(x.shape), s.view(*x.shape[:-1], num_groups)


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> (e4m3 ``[..., K]``, fp32 scales ``[..., ceil(K/group)]``); the kernel on CUDA."""
    _check_group(group)
    if _use_triton(x):
        return _quantize_per_token_group_triton(x, group)
    return quantize_per_token_group_ref(x, group)


def linear_config(num_rows: int) -> dict:
    """Tiles for a batch of ``num_rows`` tokens: a function of shapes only (fixed inside a CUDA graph)."""
    if num_rows <= LINEAR_DECODE_MAX_M:
        return LINEAR_CONFIG_DECODE
    return LINEAR_CONFIG_MEDIUM if num_rows <= LINEAR_MEDIUM_MAX_M else LINEAR_CONFIG_LARGE


def _fp8_gemm_triton(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     block: tuple[int, int], bias: torch.Tensor | None, out: torch.Tensor,
                     config: dict | None = None) -> torch.Tensor:
    """``out [M, N] = (xq * xs) @ dequant(weight)^T (+ bias)`` from already quantized activations."""
    M, K = xq.shape
    N = weight.shape[0]
    if M == 0:
        return out
    if weight.stride(1) != 1:
        raise ValueError("weight must be contiguous in K (stride 1 on its last dim)")
    cfg = config or linear_config(M)
    bm, bn = cfg["block_m"], cfg["block_n"]
    bk = math.gcd(cfg["block_k"], block[1])  # one K tile, one scale column
    ws = weight_scale_inv.contiguous()
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _w8a8_block_gemm_kernel[grid](
        xq, xs, weight, ws, out if bias is None else bias, out, M, N, K,
        xq.stride(0), xs.stride(0), weight.stride(0), ws.stride(0), out.stride(0),
        SCALE_N=block[0], SCALE_K=block[1], HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["group_m"], EVEN_K=K % bk == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                       block: tuple[int, int], bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None, config: dict | None = None) -> torch.Tensor:
    _check_kernel_block(block)
    xq, xs = _quantize_per_token_group_triton(x.reshape(-1, x.shape[-1]), block[1])
    out = torch.empty(xq.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    _fp8_gemm_triton(xq, xs, weight, weight_scale_inv, block, bias, out, config)
    return out.view(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [..., K]`` times a block-quantized e4m3 ``weight [N, K]`` -> ``[..., N]`` in ``out_dtype``
    (default x's dtype; torch.float32 gives the unrounded product, for tensor-parallel partial sums)."""
    _check_linear(x, weight, weight_scale_inv, block, bias)
    if _use_triton(x):
        return _fp8_linear_triton(x, weight, weight_scale_inv, tuple(block), bias, out_dtype)
    return fp8_linear_ref(x, weight, weight_scale_inv, block, bias, out_dtype)


def fp8_moe_config(num_tokens: int, top_k: int, num_experts: int) -> dict:
    """Tiles for a batch, by kernels.moe's rule (average pairs per expert): a function of shapes only."""
    small = num_tokens * top_k <= _moe.MOE_SMALL_AVG_PAIRS * num_experts
    return FP8_MOE_CONFIG_SMALL if small else FP8_MOE_CONFIG_LARGE


def _fused_moe_fp8_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                          topk_weights: torch.Tensor, w13_scale_inv: torch.Tensor, w2_scale_inv: torch.Tensor,
                          block: tuple[int, int], config: dict | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    _check_kernel_block(block)
    N, H = x.shape
    K = topk_ids.shape[1]
    E, I2, _ = w13.shape
    inter = I2 // 2
    if out is None:
        out = torch.empty(N, H, dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("w13 and w2 must be contiguous on their last dim")
    scale_n, group = block
    cfg = config or fp8_moe_config(N, K, E)
    bm = cfg["block_m"]
    dev = x.device
    e_pad = max(16, _next_pow2(E))
    counts, pairs, num_blocks = _moe.moe_align(topk_ids.reshape(-1), E, bm)
    xq, xs = _quantize_per_token_group_triton(x, group)
    s13, s2 = w13_scale_inv.contiguous(), w2_scale_inv.contiguous()
    act = torch.empty(num_blocks * bm, inter, dtype=FP8_DTYPE, device=dev)
    act_s = torch.empty(num_blocks * bm, triton.cdiv(inter, group), dtype=torch.float32, device=dev)
    bk = math.gcd(cfg["gu_block_k"], group)
    _moe_fp8_gate_up_kernel[(num_blocks, triton.cdiv(inter, group))](
        xq, xs, w13, s13, act, act_s, pairs, counts, H, inter, E, xq.stride(0), xs.stride(0), w13.stride(0),
        w13.stride(1), s13.stride(0), s13.stride(1), act.stride(0), act_s.stride(0),
        TOPK=K, E_PAD=e_pad, BLOCK_M=bm, GROUP=group, BLOCK_K=bk, SCALE_N=scale_n, EVEN_K=H % bk == 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out_pairs = torch.empty(N * K, H, dtype=torch.float32, device=dev)
    bn, bk = cfg["down_block_n"], math.gcd(cfg["down_block_k"], group)
    _moe_fp8_down_kernel[(num_blocks, triton.cdiv(H, bn))](
        act, act_s, w2, s2, out_pairs, pairs, counts, topk_weights.reshape(-1).to(torch.float32), H, inter, E,
        act.stride(0), act_s.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        out_pairs.stride(0), E_PAD=e_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SCALE_N=scale_n,
        SCALE_K=group, EVEN_K=inter % bk == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    block_h = min(1024, max(16, _next_pow2(H)))
    _moe._moe_sum_kernel[(N, triton.cdiv(H, block_h))](out_pairs, out, H, out_pairs.stride(0), out.stride(0),
                                                        TOPK=K, BLOCK_H=block_h, num_warps=4)
    return out


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, w13_scale_inv: torch.Tensor, w2_scale_inv: torch.Tensor,
                  block: tuple[int, int], out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``kernels.moe.fused_moe`` with e4m3 block-quantized experts; the top-k sum is fp32, rounded once."""
    _check_moe(x, w13, w2, topk_ids, topk_weights, w13_scale_inv, w2_scale_inv, block)
    if _use_triton(x):
        out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
        return _fused_moe_fp8_triton(x, w13, w2, topk_ids, topk_weights, w13_scale_inv, w2_scale_inv,
                                     tuple(block), out=out)
    return fused_moe_fp8_ref(x, w13, w2, topk_ids, topk_weights, w13_scale_inv, w2_scale_inv, block, out_dtype)
