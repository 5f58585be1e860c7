"""Fused MoE experts (SwiGLU): a Triton grouped-GEMM path (CUDA) beside a plain-PyTorch reference.

``out[n] = sum_k topk_weights[n, k] * w2[e] @ (silu(gate_e x_n) * up_e x_n)``, ``e = topk_ids[n, k]``, with
``w13 [E, 2I, H]`` (rows ``0..I-1`` gate, ``I..2I-1`` up) and ``w2 [E, H, I]``.

CUDA path (no host sync, CUDA-graph capturable; every buffer size is a function of shapes only):

1. align: the N*K (token, expert) pairs are grouped by expert on device into BLOCK_M-padded blocks. A
   pair's destination row is ``padded_start[e] + rank``, its rank within the expert coming from an atomic
   counter. The padded layout has at most ``N*K + min(E, N*K)*(BLOCK_M-1)`` rows: the grid is sized from
   that bound and blocks past the real end exit at once. Small batches do all of this in one program;
   large ones in a counting and a scattering kernel.
2. gate/up: one program per (row block, I-tile): its expert's gate and up tiles are streamed once for
   the whole block and SiLU(gate)*up is applied in registers; the activation goes to a padded buffer.
3. down: one program per (row block, H-tile); the routing weight is applied in fp32 and each pair's row
   is written to its own ``[N*K, H]`` fp32 slot (no atomics: the result is deterministic).
4. sum: ``out[n] = sum_k`` of those rows, in a fixed order, cast to x.dtype.

Row order inside an expert's block may vary between runs (atomics), but each output row of a tiled matmul
depends on its own input row only, so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routereplay.kernels.attention import HAS_TRITON, _next_pow2, _use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# Tile configurations, chosen by the average number of pairs per expert (a host-side shape fact).
# Module level so the benchmark can sweep them.
MOE_CONFIG_SMALL = dict(block_m=16, gu_block_n=32, gu_block_k=128, down_block_n=64, down_block_k=128,
                        num_warps=4, num_stages=4)
MOE_CONFIG_LARGE = dict(block_m=64, gu_block_n=64, gu_block_k=64, down_block_n=128, down_block_k=64,
                        num_warps=4, num_stages=3)
MOE_SMALL_AVG_PAIRS = 16  # at most this many pairs per expert on average -> the small (decode) tiles
MOE_ONE_PROGRAM_ALIGN_MAX = 4096  # pairs up to which the alignment runs in a single program
_ALIGN_CHUNK = 1024


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact, vectorised reference: pairs sorted by expert, one batched matmul per expert present."""
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
    xf = x.float()
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        start += c
        t = tokens[sl]
        gate_up = xf[t] @ w13[e].float().t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = act @ w2[e].float().t()
        out.index_add_(0, t, y * weights[sl, None])
    return out.to(out_dtype or x.dtype)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _moe_align_one_program_kernel(ids_ptr, counts_ptr, cursor_ptr, pairs_ptr, M, E,
                                      E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
        # Small batches: count, prefix-sum and scatter in one CTA; barriers order the phases.
        e = tl.arange(0, E_PAD)
        e_mask = e < E
        tl.store(counts_ptr + e, tl.zeros([E_PAD], tl.int32), mask=e_mask)
        tl.debug_barrier()
        for c0 in range(0, M, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            m = offs < M
            ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
            tl.atomic_add(counts_ptr + ids, 1, mask=m, sem="relaxed")  # the barrier orders
        tl.debug_barrier()
        # volatile: read the atomics' result from L2, never a stale L1 line of the zeroing stores.
        cnt = tl.load(counts_ptr + e, mask=e_mask, other=0, volatile=True)
        padded = tl.cdiv(cnt, BLOCK_M) * BLOCK_M
        tl.store(cursor_ptr + e, tl.cumsum(padded, 0) - padded, mask=e_mask)  # padded start of each expert
        tl.debug_barrier()
        for c0 in range(0, M, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            m = offs < M
            ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
            dest = tl.atomic_add(cursor_ptr + ids, 1, mask=m, sem="relaxed")
            tl.store(pairs_ptr + dest, offs, mask=m)

    @triton.jit(do_not_specialize=["M"])
    def _moe_count_kernel(ids_ptr, counts_ptr, rank_ptr, M, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < M
        ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
        rank = tl.atomic_add(counts_ptr + ids, 1, mask=m, sem="relaxed")  # kernel end orders
        tl.store(rank_ptr + offs, rank, mask=m)

    @triton.jit(do_not_specialize=["M"])
    def _moe_scatter_kernel(ids_ptr, counts_ptr, rank_ptr, pairs_ptr, M, E,
                            E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
        # Every program recomputes the (tiny) prefix sum of padded counts rather than waiting on another.
        e = tl.arange(0, E_PAD)
        cnt = tl.load(counts_ptr + e, mask=e < E, other=0)
        padded = tl.cdiv(cnt, BLOCK_M) * BLOCK_M
        start = tl.cumsum(padded, 0) - padded
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < M
        ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
        rank = tl.load(rank_ptr + offs, mask=m, other=0)
        my_start = tl.sum(tl.where(e[None, :] == ids[:, None], start[None, :], 0), 1)
        tl.store(pairs_ptr + my_start + rank, offs, mask=m)

    @triton.jit
    def _block_expert(counts_ptr, E, row0, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
        """Expert owning padded row ``row0`` (E when past the end), its first padded row and its count."""
        e = tl.arange(0, E_PAD)
        cnt = tl.load(counts_ptr + e, mask=e < E, other=0)
        padded = tl.cdiv(cnt, BLOCK_M) * BLOCK_M
        end = tl.cumsum(padded, 0)
        expert = tl.sum(tl.where((end <= row0) & (e < E), 1, 0), 0)
        mine = e == expert
        start = tl.sum(tl.where(mine, end - padded, 0), 0)
        count = tl.sum(tl.where(mine, cnt, 0), 0)
        return expert, start, count

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, w_ptr, act_ptr, pairs_ptr, counts_ptr, H, inter, E,
                            stride_xn, stride_we, stride_wn, stride_an,
                            TOPK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                            DOT_PREC: tl.constexpr):
        row0 = tl.program_id(0) * BLOCK_M
        expert, start, count = _block_expert(counts_ptr, E, row0, E_PAD, BLOCK_M)
        if expert >= E:
            return
        rows = row0 + tl.arange(0, BLOCK_M)
        valid = rows - start < count
        pair = tl.load(pairs_ptr + rows, mask=valid, other=0)
        tok = (pair // TOPK).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xn + offs_k[None, :]
        g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn \
            + offs_k[None, :]
        u_ptrs = g_ptrs + inter * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
                wg = tl.load(g_ptrs, mask=n_mask[:, None], other=0.0)
                wu = tl.load(u_ptrs, mask=n_mask[:, None], other=0.0)
            else:
                k_mask = offs_k < H - k0
                a = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
                wg = tl.load(g_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                wu = tl.load(u_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc_g = tl.dot(a, tl.trans(wg), acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        # Rows of a live block that hold no pair get silu(0)*0 = 0: the down kernel may read them safely.
        tl.store(act_ptr + rows[:, None].to(tl.int64) * stride_an + offs_n[None, :],
                 act.to(act_ptr.dtype.element_ty), mask=n_mask[None, :])

    @triton.jit
    def _moe_down_kernel(act_ptr, w_ptr, outp_ptr, pairs_ptr, counts_ptr, wts_ptr, H, inter, E,
                         stride_an, stride_we, stride_wn, stride_on,
                         E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
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
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn \
            + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            else:
                k_mask = offs_k < inter - k0
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        rw = tl.load(wts_ptr + pair, mask=valid, other=0.0)
        acc = acc * rw[:, None]
        tl.store(outp_ptr + pair[:, None].to(tl.int64) * stride_on + offs_n[None, :], acc,
                 mask=valid[:, None] & n_mask[None, :])

    @triton.jit
    def _moe_sum_kernel(outp_ptr, out_ptr, H, stride_on, stride_out,
                        TOPK: tl.constexpr, BLOCK_H: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = offs < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        for k in tl.static_range(TOPK):  # fixed order: deterministic
            acc += tl.load(outp_ptr + (n * TOPK + k) * stride_on + offs, mask=m, other=0.0)
        tl.store(out_ptr + n * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def moe_config(num_tokens: int, top_k: int, num_experts: int) -> dict:
    """Tiles for a batch: a function of shapes only (fixed inside a CUDA graph)."""
    small = num_tokens * top_k <= MOE_SMALL_AVG_PAIRS * num_experts
    return MOE_CONFIG_SMALL if small else MOE_CONFIG_LARGE


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Step 1 on the device: the flat (token, expert) pair ids grouped by expert into block_m-padded blocks.
    Returns (counts [E], pairs [num_blocks * block_m] of pair indices, num_blocks: a bound from shapes only)."""
    M, E, dev = ids.numel(), num_experts, ids.device
    e_pad = max(16, _next_pow2(E))
    # Upper bound on padded rows: each non-empty expert (at most min(E, M)) wastes < block_m rows.
    num_blocks = triton.cdiv(M + min(E, M) * (block_m - 1), block_m)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    if M <= MOE_ONE_PROGRAM_ALIGN_MAX:
        cursor = torch.empty(E, dtype=torch.int32, device=dev)
        _moe_align_one_program_kernel[(1,)](ids, counts, cursor, pairs, M, E, E_PAD=e_pad, BLOCK_M=block_m,
                                            CHUNK=min(_ALIGN_CHUNK, max(16, _next_pow2(M))), num_warps=4)
    else:
        counts.zero_()
        rank = torch.empty(M, dtype=torch.int32, device=dev)
        _moe_count_kernel[(triton.cdiv(M, 1024),)](ids, counts, rank, M, BLOCK=1024, num_warps=4)
        blk = max(16, 8192 // e_pad)  # keeps the [BLOCK, E_PAD] compare small
        _moe_scatter_kernel[(triton.cdiv(M, blk),)](ids, counts, rank, pairs, M, E, E_PAD=e_pad,
                                                    BLOCK_M=block_m, BLOCK=blk, num_warps=4)
    return counts, pairs, num_blocks


def _fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor, config: dict | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    N, H = x.shape
    K = topk_ids.shape[1]
    E, I2, _ = w13.shape
    inter = I2 // 2
    M = N * K
    if out is None:
        out = torch.empty(N, H, dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    assert w13.shape[2] == H and tuple(w2.shape) == (E, H, inter)
    cfg = config or moe_config(N, K, E)
    bm = cfg["block_m"]
    dev = x.device
    ids = topk_ids.reshape(-1)
    wts = topk_weights.reshape(-1).to(torch.float32)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    e_pad = max(16, _next_pow2(E))
    counts, pairs, num_blocks = moe_align(ids, E, bm)
    act = torch.empty(num_blocks * bm, inter, dtype=x.dtype, device=dev)
    bn, bk = cfg["gu_block_n"], cfg["gu_block_k"]
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, bn))](
        x, w13, act, pairs, counts, H, inter, E, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOPK=K, E_PAD=e_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=H % bk == 0, DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out_pairs = torch.empty(M, H, dtype=torch.float32, device=dev)
    bn, bk = cfg["down_block_n"], cfg["down_block_k"]
    _moe_down_kernel[(num_blocks, triton.cdiv(H, bn))](
        act, w2, out_pairs, pairs, counts, wts, H, inter, E, act.stride(0), w2.stride(0), w2.stride(1),
        out_pairs.stride(0), E_PAD=e_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=inter % bk == 0,
        DOT_PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    block_h = min(1024, max(16, _next_pow2(H)))
    _moe_sum_kernel[(N, triton.cdiv(H, block_h))](out_pairs, out, H, out_pairs.stride(0), out.stride(0),
                                                   TOPK=K, BLOCK_H=block_h, num_warps=4)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Routed SwiGLU experts: ``x [N, H]``, ``topk_ids``/``topk_weights [N, K]`` -> ``[N, H]``.

    The top-k sum is accumulated in fp32 and rounded to ``out_dtype`` (default: ``x``'s dtype).
    """
    if _use_triton(x):
        out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
        return _fused_moe_triton(x, w13, w2, topk_ids, topk_weights, out=out)
    return fused_moe_ref(x, w13, w2, topk_ids, topk_weights, out_dtype)
