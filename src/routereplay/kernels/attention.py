"""Paged attention and KV-cache writes: Triton kernels (CUDA) beside plain-PyTorch references (CPU, tests).

KV cache layout, per layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``;
the slot of a token is ``block_id * block_size + offset``. ``block_tables [S, max_blocks]`` (int32) maps a
sequence's logical block to its physical block; entries past the sequence's length are never read.
``context_lens [S]`` (int32) counts the sequence's cached tokens including this step's new ones.

Public functions dispatch on the inputs: CUDA tensors with Triton importable -> Triton kernel, otherwise
the reference. The CUDA paths make no host sync, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
import math

import torch

try:  # optional: CPU builds and CI have no triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

# Tunables (module level so the benchmark can sweep them); values from sweeps on an H200, bf16, D=128.
DECODE_BLOCK_N = 64  # KV tokens per inner iteration of decode
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
DECODE_MIN_SPLIT_TOKENS = 64  # never split the KV length finer than this
DECODE_MAX_SPLITS = 64
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 3

_LOG2E = 1.4426950408889634


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [blocks, block_size, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")


# ----------------------------------------------------------------------------------------------------------
# References (the CPU path of the engine; also what the Triton kernels are tested against)
# ----------------------------------------------------------------------------------------------------------


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Write k/v rows to their cache slots in place; rows whose slot is negative are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)


def _gather_slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of ``positions`` ([S, L], or [L] with a 1-D table); unused table entries may be -1."""
    blocks = torch.gather(block_tables.long(), -1, torch.div(positions, block_size, rounding_mode="floor"))
    return blocks.clamp_min(0) * block_size + positions % block_size


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """One query per sequence attending to its ``context_len`` cached tokens; vectorised over the batch."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    out = torch.zeros(B, Hq, D, dtype=q.dtype, device=q.device)
    lens = context_lens.long()
    max_len = int(lens.max()) if B else 0
    if max_len == 0:
        return out
    pos = torch.arange(max_len, device=q.device).expand(B, max_len)
    valid = pos < lens[:, None]
    # Positions past a sequence's length would index unused table entries: point them at position 0.
    slots = _gather_slots(block_tables, torch.where(valid, pos, 0), block_size)  # [B, L]
    k = k_cache.view(-1, Hkv, D)[slots].float()  # [B, L, Hkv, D]
    v = v_cache.view(-1, Hkv, D)[slots].float()
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with context_len 0 -> zeros
    o = torch.einsum("bhgl,blhd->bhgd", probs, v).reshape(B, Hq, D)
    return o.to(q.dtype)


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                          scale: float, max_seqlen_q: int | None = None) -> torch.Tensor:
    """Causal varlen attention of the new tokens of each sequence over its whole cached context."""
    N, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    out = torch.zeros(N, Hq, D, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for s, ctx in enumerate(lens):
        q0, q1 = cu[s], cu[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = _gather_slots(block_tables[s], pos, block_size)
        k = k_cache.view(-1, Hkv, D)[slots].float()  # [ctx, Hkv, D]
        v = v_cache.view(-1, Hkv, D)[slots].float()
        qs = q[q0:q1].float().view(q_len, Hkv, G, D)
        scores = torch.einsum("qhgd,khd->hgqk", qs, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        scores = scores.masked_fill(pos[None, :] > q_pos[:, None], float("-inf"))
        o = torch.einsum("hgqk,khd->qhgd", torch.softmax(scores, dim=-1), v)
        out[q0:q1] = o.reshape(q_len, Hq, D).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                         stride_kn, stride_kh, stride_vn, stride_vh,
                         KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, HEAD_D: tl.constexpr,
                         D_PAD: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        if slot < 0:  # CUDA-graph padding row: writes nothing
            return
        h = tl.arange(0, H_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < KV_HEADS) & (d < HEAD_D)
        dst = slot * (KV_HEADS * HEAD_D) + h * HEAD_D + d
        kv = tl.load(k_ptr + n * stride_kn + h * stride_kh + d, mask=mask)
        tl.store(kc_ptr + dst, kv.to(kc_ptr.dtype.element_ty), mask=mask)
        vv = tl.load(v_ptr + n * stride_vn + h * stride_vh + d, mask=mask)
        tl.store(vc_ptr + dst, vv.to(vc_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["stride_bt"])
    def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_ml_ptr,
                             qk_scale, stride_qb, stride_qh, stride_bt, stride_ob, stride_oh,
                             GROUP: tl.constexpr, G_PAD: tl.constexpr, KV_HEADS: tl.constexpr,
                             HEAD_D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                             BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr):
        # One program = (sequence, kv head, split): all GROUP query heads sharing the kv head ride along as
        # the M dimension of the dots, so each KV tile is loaded once per group.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        # Each split takes a contiguous, BLOCK_N-aligned share of this sequence's length (decided on device,
        # so the grid never depends on context_lens); splits past the end do no work.
        per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, ctx)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        heads = kvh * GROUP + g
        g_mask = g < GROUP
        d_mask = d < HEAD_D
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        row_stride = KV_HEADS * HEAD_D  # elements per cache slot
        for t0 in range(start, end, BLOCK_N):
            offs = t0 + tl.arange(0, BLOCK_N)
            n_mask = offs < end
            blk = tl.load(bt_ptr + b * stride_bt + offs // PAGE, mask=n_mask, other=0)
            slot = blk.to(tl.int64) * PAGE + offs % PAGE
            kv_off = slot[:, None] * row_stride + kvh * HEAD_D + d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every visited tile has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        if NUM_SPLITS == 1:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # context_len 0 -> zeros
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            # Partials: [B, Hq, NUM_SPLITS, D] unnormalised acc and [B, Hq, NUM_SPLITS, 2] (max, sum).
            row = (b * (KV_HEADS * GROUP) + heads) * NUM_SPLITS + split
            tl.store(part_o_ptr + row[:, None].to(tl.int64) * HEAD_D + d[None, :], acc,
                     mask=g_mask[:, None] & d_mask[None, :])
            tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)

    @triton.jit
    def _decode_reduce_kernel(part_o_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh,
                              NUM_HEADS: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
                              NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D_PAD)
        s_mask = sp < NUM_SPLITS
        row = (b * NUM_HEADS + h) * NUM_SPLITS + sp
        m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
        lsum = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty (context_len 0)
        w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
        total = tl.sum(lsum * w, 0)
        acc = tl.load(part_o_ptr + row[:, None].to(tl.int64) * HEAD_D + d[None, :],
                      mask=s_mask[:, None] & (d[None, :] < HEAD_D), other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_D)

    @triton.jit(do_not_specialize=["stride_bt"])
    def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr,
                        qk_scale, stride_qn, stride_qh, stride_bt, stride_on, stride_oh,
                        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                        KV_HEADS: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
                        PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PREC: tl.constexpr):
        # Heads vary fastest so programs sharing a kv head run together (K/V tiles hit L2); the last (most
        # expensive, causal) query tiles are scheduled first. The tile count is read from the grid: as a
        # constexpr it compiled a new kernel for every longest-prompt length a step had.
        h = tl.program_id(0)
        tile = tl.num_programs(1) - 1 - tl.program_id(1)
        s = tl.program_id(2)
        q_start = tl.load(cu_ptr + s)
        q_len = tl.load(cu_ptr + s + 1) - q_start
        m0 = tile * BLOCK_M
        if m0 >= q_len:
            return
        ctx = tl.load(ctx_ptr + s)
        prefix = ctx - q_len  # absolute position of the first new token
        kvh = h // GROUP

        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_D
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qn + h * stride_qh + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        q_pos = prefix + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        row_stride = KV_HEADS * HEAD_D
        bt_row = bt_ptr + s * stride_bt

        # Phase 1: keys before the tile's first query are visible to every row: no causal mask.
        full_end = ((prefix + m0) // BLOCK_N) * BLOCK_N
        for t0 in range(0, full_end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            blk = tl.load(bt_row + offs_n // PAGE)
            slot = blk.to(tl.int64) * PAGE + offs_n % PAGE
            kv_off = slot[:, None] * row_stride + kvh * HEAD_D + d[None, :]
            k = tl.load(kc_ptr + kv_off, mask=d_mask[None, :], other=0.0)
            v = tl.load(vc_ptr + kv_off, mask=d_mask[None, :], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        # Phase 2: the diagonal band, masked. Its first key (full_end <= every row's position) is visible
        # to every row, so the running max is finite from the first tile on.
        band_end = tl.minimum(ctx, prefix + m0 + BLOCK_M)
        for t0 in range(full_end, band_end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < band_end
            blk = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0)
            slot = blk.to(tl.int64) * PAGE + offs_n % PAGE
            kv_off = slot[:, None] * row_stride + kvh * HEAD_D + d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
            sc = tl.where(visible, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_on + h * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 models get exact fp32 dots (Triton would otherwise use tf32); ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    N = k.shape[0]
    if N == 0:
        return
    _, _, Hkv, D = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    _store_kv_kernel[(N,)](k, v, k_cache, v_cache, slot_mapping,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1), KV_HEADS=Hkv,
                           H_PAD=_next_pow2(Hkv), HEAD_D=D, D_PAD=_next_pow2(D), num_warps=4)


def decode_num_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int,
                      device: torch.device) -> int:
    """Number of KV splits of decode: a function of shapes only, so it is fixed inside a CUDA graph."""
    max_tokens = max_blocks * block_size
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    base = batch * kv_heads
    want = 1 if base >= 2 * sms else math.ceil(2 * sms / base)
    cap = max(1, math.ceil(max_tokens / DECODE_MIN_SPLIT_TOKENS))
    return max(1, min(want, cap, DECODE_MAX_SPLITS))


def _decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                             num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    assert out.stride(2) == 1
    if B == 0:
        return out
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    assert block_tables.stride(1) == 1
    group = Hq // Hkv
    if num_splits is None:
        num_splits = decode_num_splits(B, Hkv, block_tables.shape[1], page, q.device)
    d_pad = max(16, _next_pow2(D))
    if num_splits > 1:
        part_o = torch.empty(B * Hq * num_splits * D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B * Hq * num_splits * 2, dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out  # unused
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_o, part_ml,
        scale * _LOG2E, q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, G_PAD=max(16, _next_pow2(group)), KV_HEADS=Hkv, HEAD_D=D, D_PAD=d_pad, PAGE=page,
        BLOCK_N=DECODE_BLOCK_N if q.element_size() <= 2 else min(DECODE_BLOCK_N, 32), NUM_SPLITS=num_splits,
        DOT_PREC=_dot_prec(q.dtype),
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES)
    if num_splits > 1:
        _decode_reduce_kernel[(B, Hq)](part_o, part_ml, out, out.stride(0), out.stride(1),
                                       NUM_HEADS=Hq, HEAD_D=D, D_PAD=d_pad, NUM_SPLITS=num_splits,
                                       SPLITS_PAD=_next_pow2(num_splits), num_warps=4)
    return out


def _prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              context_lens: torch.Tensor, scale: float, max_seqlen_q: int,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    N, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    S = context_lens.shape[0]
    if out is None:
        out = torch.empty(N, Hq, D, dtype=q.dtype, device=q.device)
    assert out.stride(2) == 1
    if N == 0 or S == 0 or max_seqlen_q <= 0:
        return out
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(2) == 1
    assert block_tables.stride(1) == 1
    block_m, block_n = PREFILL_BLOCK_M, PREFILL_BLOCK_N
    if q.element_size() > 2:  # fp32: no tensor cores, smaller tiles keep it out of local memory
        block_m, block_n = min(block_m, 64), min(block_n, 32)
    # Small query counts (decode-heavy batches, tiny models) waste less with a smaller tile.
    while block_m > 16 and block_m // 2 >= max_seqlen_q:
        block_m //= 2
    num_tiles = triton.cdiv(max_seqlen_q, block_m)
    _prefill_kernel[(Hq, num_tiles, S)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * _LOG2E, q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=Hq, GROUP=Hq // Hkv, KV_HEADS=Hkv, HEAD_D=D,
        D_PAD=max(16, _next_pow2(D)), PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PREC=_dot_prec(q.dtype), num_warps=PREFILL_NUM_WARPS if block_m >= 64 else 4,
        num_stages=PREFILL_NUM_STAGES)
    return out


# ----------------------------------------------------------------------------------------------------------
# Public API (dispatching)
# ----------------------------------------------------------------------------------------------------------


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` ``[N, Hkv, D]`` to the caches at ``slot_mapping [N]``; negative slots are skipped."""
    _check_cache(k_cache, v_cache)
    if _use_triton(k):
        _store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Paged decode attention: ``q [B, Hq, D]`` (one query per sequence) -> ``[B, Hq, D]``."""
    _check_cache(k_cache, v_cache)
    if _use_triton(q):
        return _decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                      scale: float, max_seqlen_q: int) -> torch.Tensor:
    """Causal varlen paged attention of the new tokens ``q [N, Hq, D]`` over each sequence's cache."""
    _check_cache(k_cache, v_cache)
    if _use_triton(q):
        return _prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                         scale, max_seqlen_q)
    return prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                 max_seqlen_q)
