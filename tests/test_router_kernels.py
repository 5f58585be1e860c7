"""The router epilogue and routing-cache write kernels (kernels/router.py) against their references: under the
Triton interpreter (TRITON_INTERPRET=1 with triton installed) and on a GPU (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from routereplay.kernels import router
from routereplay.kernels.router import RoutingRecord, record_routing_ref, softmax_topk_ref
from tests.test_fused import INTERPRET, requires_gpu

interpret = pytest.mark.skipif(not INTERPRET, reason="interpreter tests need TRITON_INTERPRET=1 and triton")
CASES = [(1, 128, 8, True), (7, 60, 2, False), (300, 8, 2, True), (33, 128, 1, False), (5, 512, 8, True)]


def _check_topk(logits: torch.Tensor, k: int, renorm: bool) -> None:
    ids, w = router._softmax_topk_triton(logits, k, renorm)
    ref_ids, ref_w = softmax_topk_ref(logits, k, renorm)
    # the same experts (bf16 logits tie often: tied experts may come in either order), the same weight per expert
    # up to the softmax sum's rounding
    order, ref_order = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    tol = dict(rtol=1e-6, atol=1e-7) if logits.dtype == torch.float32 else dict(rtol=8e-3, atol=0)
    torch.testing.assert_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices), **tol)
    assert w.dtype == torch.float32


def _check_record(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    cache = torch.randint(0, 200, (41, 3, 8), generator=g, dtype=torch.uint8).to(device)
    slots = torch.tensor([5, 0, -1, 39, 17, -1, 2], device=device)
    ids = torch.randint(0, 128, (7, 8), generator=g).to(device)
    for moe_index, rows in ((1, ids), (2, torch.arange(7, device=device)[:, None].expand(7, 8))):  # debug: positions
        want = cache.clone()
        record_routing_ref(want, slots, moe_index, rows)
        router._record_routing_triton(cache, slots, moe_index, rows)
        # the last row is the padding rows' scratch slot: two padding rows race for it (on a GPU either may win)
        assert torch.equal(cache[:-1], want[:-1])
        assert any(torch.equal(cache[-1, moe_index], rows[i].to(cache.dtype)) for i in (2, 5))
        assert torch.equal(cache[-1, :moe_index], want[-1, :moe_index])


def _check_fused_record(device: str, dtype: torch.dtype, debug: bool) -> None:
    """The router epilogue with its routing write fused: the same ids and weights as without it, and the cache
    as the unfused write leaves it (one padding row, slot -1: the scratch row)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 128, generator=g).to(device)
    cache = torch.randint(0, 100, (50, 3, 8), generator=g).to(device, dtype)
    slots = torch.tensor([7, 0, 48, -1, 12, 13, 30, 2, 41], device=device)
    positions = torch.arange(100, 109, device=device) if debug else None
    want_ids, want_w = router._softmax_topk_triton(logits, 8, True)
    want = cache.clone()
    record_routing_ref(want, slots, 1, want_ids if not debug else positions[:, None].expand(9, 8))
    ids, w = router._softmax_topk_triton(logits, 8, True, RoutingRecord(cache, slots, 1, positions))
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)
    assert torch.equal(cache, want)


@interpret
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
@pytest.mark.parametrize("debug", [False, True])
def test_interp_softmax_topk_writes_routing(dtype, debug):
    _check_fused_record("cpu", dtype, debug)


@interpret
@pytest.mark.parametrize("n,e,k,renorm", CASES)
def test_interp_softmax_topk(n, e, k, renorm):
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(n + e))
    _check_topk(logits, k, renorm)


@interpret
def test_interp_softmax_topk_ties_go_to_the_lower_expert():
    logits = torch.zeros(2, 16)
    logits[0, [3, 9, 12]] = 1.0
    ids, _ = router._softmax_topk_triton(logits, 2, True)
    assert ids.tolist() == [[3, 9], [0, 1]]


@interpret
def test_interp_record_routing():
    _check_record("cpu")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,e,k,renorm", CASES)
def test_gpu_softmax_topk(n, e, k, renorm, dtype):
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(n + e)).to("cuda", dtype)
    _check_topk(logits, k, renorm)


@pytest.mark.gpu
@requires_gpu
def test_gpu_record_routing():
    _check_record("cuda")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
@pytest.mark.parametrize("debug", [False, True])
def test_gpu_softmax_topk_writes_routing(dtype, debug):
    _check_fused_record("cuda", dtype, debug)
