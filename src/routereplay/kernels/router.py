"""The softmax top-k router's epilogue and the routing-cache write, one kernel on CUDA beside their references.

A decode step at batch 1 is launch-bound: per MoE layer the PyTorch router ran softmax, top-k, the top-k
renormalisation and two casts (six kernels), and the routing write a cast and an index_put (two). Here the
epilogue is one Triton program per token row, and it writes the row's routing too when given a
``RoutingRecord`` (so capture adds no kernel to a softmax router); ``record_routing`` alone serves the
other routers.

``softmax_topk`` selects by the logits, which orders experts exactly as the fp32 softmax does (it is
monotonic), with ties to the lower expert id; the weights are the softmax's, rounded to the logits' dtype as
the reference model does. ``record_routing`` writes ``ids`` cast to the cache's dtype at
``cache[slots, moe_index]``; slot -1 (padding) indexes the cache's last, scratch row, as in Python.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from routereplay.kernels.attention import HAS_TRITON, _next_pow2, _use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except Exception:  # pragma: no cover - older triton
        libdevice = None

ROUTER_MAX_EXPERTS = 1024  # more experts than this take the reference path (one row must fit a program)


def softmax_topk_ref(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2/Qwen3-MoE / Mixtral selection: fp32 softmax over every expert, top-k, optional renormalisation,
    weights rounded to the logits' dtype. Returns (ids int64 [N, k], weights fp32 [N, k])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(logits.dtype).float()


def record_routing_ref(cache: torch.Tensor, slots: torch.Tensor, moe_index: int, ids: torch.Tensor) -> None:
    cache[slots, moe_index] = ids.to(cache.dtype)


class RoutingRecord(NamedTuple):
    """Where a router's selection is written: ``cache[slots, moe_index]``; with ``positions`` (debug
    capture) each row's position instead of its ids."""

    cache: torch.Tensor
    slots: torch.Tensor
    moe_index: int
    positions: torch.Tensor | None = None

    def write(self, ids: torch.Tensor) -> None:
        """The write alone (routers whose selection is not fused with it)."""
        rows = ids if self.positions is None else self.positions[:, None].expand_as(ids)
        record_routing(self.cache, self.slots, self.moe_index, rows)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["stride_l"])
    def _softmax_topk_kernel(logits_ptr, ids_ptr, w_ptr, stride_l, E, cache_ptr, slots_ptr, pos_ptr, stride_cs,
                             scratch, TOP_K: tl.constexpr, E_PAD: tl.constexpr, RENORM: tl.constexpr,
                             ROUND_BF16: tl.constexpr, ROUND_F16: tl.constexpr, PRECISE_EXP: tl.constexpr,
                             RECORD: tl.constexpr, DEBUG: tl.constexpr):
        row = tl.program_id(0)
        e = tl.arange(0, E_PAD)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        if PRECISE_EXP:  # as accurate as torch's expf; tl.exp is an approximation (the interpreter has no libdevice)
            p = libdevice.exp(x - m)
        else:
            p = tl.exp(x - m)
        total = tl.sum(p, 0)
        k = tl.arange(0, TOP_K)
        chosen_ids = tl.zeros([TOP_K], tl.int64)
        chosen_p = tl.zeros([TOP_K], tl.float32)
        left = x
        for j in tl.static_range(TOP_K):
            best = tl.max(left, 0)
            idx = tl.min(tl.where(left == best, e, E_PAD), 0)  # ties: the lower expert id, as sorted top-k
            chosen_ids = tl.where(k == j, idx.to(tl.int64), chosen_ids)
            chosen_p = tl.where(k == j, tl.sum(tl.where(e == idx, p, 0.0), 0) / total, chosen_p)
            left = tl.where(e == idx, float("-inf"), left)
        if RENORM:
            chosen_p = chosen_p / tl.sum(chosen_p, 0)
        if ROUND_BF16:
            chosen_p = chosen_p.to(tl.bfloat16).to(tl.float32)
        if ROUND_F16:
            chosen_p = chosen_p.to(tl.float16).to(tl.float32)
        tl.store(ids_ptr + row * TOP_K + k, chosen_ids)
        tl.store(w_ptr + row * TOP_K + k, chosen_p)
        if RECORD:  # the routing write of this row (cache_ptr is the MoE layer's view), as _record_routing_kernel
            slot = tl.load(slots_ptr + row)
            slot = tl.where(slot < 0, scratch, slot)
            if DEBUG:
                chosen_ids = tl.zeros([TOP_K], tl.int64) + tl.load(pos_ptr + row).to(tl.int64)
            tl.store(cache_ptr + slot.to(tl.int64) * stride_cs + k, chosen_ids.to(cache_ptr.dtype.element_ty))

    @triton.jit(do_not_specialize=["N", "stride_in"])
    def _record_routing_kernel(cache_ptr, slots_ptr, ids_ptr, stride_in, stride_ik, stride_cs, scratch, N,
                               TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        k = tl.arange(0, TOP_K)
        mask = r < N
        slot = tl.load(slots_ptr + r, mask=mask, other=0)
        slot = tl.where(slot < 0, scratch, slot)
        ids = tl.load(ids_ptr + r[:, None].to(tl.int64) * stride_in + k[None, :] * stride_ik, mask=mask[:, None])
        tl.store(cache_ptr + slot[:, None].to(tl.int64) * stride_cs + k[None, :],
                 ids.to(cache_ptr.dtype.element_ty), mask=mask[:, None])


def _softmax_topk_triton(logits: torch.Tensor, top_k: int, renormalize: bool,
                         record: RoutingRecord | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n, e = logits.shape
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    if n:
        if record is None:  # the record arguments are unused (RECORD is compiled out): any tensor will do
            layer, slots, pos, stride_cs, scratch = logits, logits, logits, 0, 0
        else:
            layer, slots = record.cache[:, record.moe_index], record.slots  # a view: its offset selects the layer
            pos = record.positions if record.positions is not None else slots
            stride_cs, scratch = record.cache.stride(0), record.cache.shape[0] - 1
        _softmax_topk_kernel[(n,)](logits, ids, weights, logits.stride(0), e, layer, slots, pos, stride_cs, scratch,
                                   TOP_K=top_k, E_PAD=_next_pow2(e), RENORM=renormalize,
                                   ROUND_BF16=logits.dtype == torch.bfloat16, ROUND_F16=logits.dtype == torch.float16,
                                   PRECISE_EXP=logits.is_cuda, RECORD=record is not None,
                                   DEBUG=record is not None and record.positions is not None,
                                   num_warps=1 if e <= 256 else 4)
    return ids, weights


def _record_routing_triton(cache: torch.Tensor, slots: torch.Tensor, moe_index: int, ids: torch.Tensor) -> None:
    n, k = ids.shape
    if n:
        block = 64
        layer = cache[:, moe_index]  # a view: its offset selects the MoE layer
        _record_routing_kernel[(triton.cdiv(n, block),)](
            layer, slots, ids, ids.stride(0), ids.stride(1), cache.stride(0), cache.shape[0] - 1, n,
            TOP_K=k, BLOCK=block, num_warps=1)


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool,
                 record: RoutingRecord | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_topk_ref``'s selection and weights, written to ``record`` when given; one kernel on CUDA."""
    e = logits.shape[1]
    written = () if record is None else (record.cache, record.slots, record.positions)
    if (_use_triton(logits) and libdevice is not None and e <= ROUTER_MAX_EXPERTS and top_k <= e
            and top_k == _next_pow2(top_k) and logits.stride(1) == 1
            and all(t is None or t.is_contiguous() for t in written)):
        return _softmax_topk_triton(logits, top_k, renormalize, record)
    ids, weights = softmax_topk_ref(logits, top_k, renormalize)
    if record is not None:
        record.write(ids)
    return ids, weights


def record_routing(cache: torch.Tensor, slots: torch.Tensor, moe_index: int, ids: torch.Tensor) -> None:
    """``cache[slots, moe_index] = ids`` (cast to the cache's dtype) in one kernel on CUDA."""
    k = ids.shape[1]
    if _use_triton(cache) and k == _next_pow2(k) and cache.is_contiguous():
        _record_routing_triton(cache, slots, moe_index, ids)
    else:
        record_routing_ref(cache, slots, moe_index, ids)
