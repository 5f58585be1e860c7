"""Kernel timings at Qwen3-30B-A3B's shape (bf16): time, bytes that must move, achieved bandwidth.

    PYTHONPATH=src python benchmarks/kernels.py [--sweep]

Each timed graph replays R calls on R different inputs (different KV blocks, different experts) so that
data comes from HBM, not L2; ``triton.testing.do_bench`` also flushes L2 between replays. "graph" is the
per-call time inside a CUDA graph (how the engine runs decode); "eager" is one plain call per launch,
CPU launch overhead included. ``--sweep`` also times alternative tile configurations.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from routereplay.kernels import attention as A
from routereplay.kernels import moe as M

PEAK_BW = 4.3e12  # bytes/s: device-to-device copy measured on this H200 kind (KINDS.md)
PEAK_BF16 = 790e12  # FLOP/s: 8192^3 bf16 matmul measured on this kind
HQ, HKV, D, BS = 32, 4, 128, 16
E, K, H, INTER = 128, 8, 2048, 768
DT = torch.bfloat16
ROWS: list[str] = []


def do_bench(fn, reps: int = 1) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e-3 / reps


def graph_of(calls) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def report(name: str, seconds: float, nbytes: float | None = None, flops: float | None = None,
           extra: str = "") -> None:
    line = f"{name:44s} {seconds * 1e6:9.1f} us"
    if nbytes is not None:
        bw = nbytes / seconds
        line += f"  {nbytes / 1e6:8.1f} MB  {bw / 1e12:5.2f} TB/s ({bw / PEAK_BW:4.0%})"
    if flops is not None:
        line += f"  {flops / seconds / 1e12:6.1f} TFLOP/s ({flops / seconds / PEAK_BF16:4.0%})"
    line += f"  {extra}"
    ROWS.append(line)
    print(line, flush=True)


def measure_copy_bw() -> None:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a))
    report("device copy 2 GiB (read+write)", t, 2 * a.numel())


# ---------------------------------------------------------------------------------------------- attention


def decode_inputs(batch: int, ctx: int, reps: int, table_blocks: int | None = None):
    nb = math.ceil(ctx / BS)
    width = max(nb, table_blocks or nb)
    kc = torch.randn(reps * batch * nb, BS, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    perm = torch.randperm(reps * batch * nb, device="cuda").to(torch.int32).view(reps, batch, nb)
    tables = torch.zeros(reps, batch, width, dtype=torch.int32, device="cuda")
    tables[:, :, :nb] = perm
    q = torch.randn(reps, batch, HQ, D, device="cuda", dtype=DT)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, kc, vc, tables, lens


def bench_decode(batch: int, ctx: int, table_blocks: int | None = None, tag: str = "") -> float:
    kv_bytes = batch * ctx * HKV * D * 2 * 2
    reps = max(1, min(32, math.ceil(256e6 / kv_bytes)))
    q, kc, vc, tables, lens = decode_inputs(batch, ctx, reps, table_blocks)
    scale = D ** -0.5
    calls = [lambda r=r: A.decode_attention(q[r], kc, vc, tables[r], lens, scale) for r in range(reps)]
    g = graph_of(calls)
    t = do_bench(g.replay, reps)
    nbytes = kv_bytes + batch * HQ * D * 2 * 2
    splits = A.decode_num_splits(batch, HKV, tables.shape[2], BS, q.device)
    report(f"decode_attention B={batch} ctx={ctx}{tag}", t, nbytes, extra=f"splits={splits}")
    return t


def bench_decode_eager(batch: int, ctx: int) -> None:
    q, kc, vc, tables, lens = decode_inputs(batch, ctx, 1)
    t = do_bench(lambda: A.decode_attention(q[0], kc, vc, tables[0], lens, D ** -0.5))
    report(f"decode_attention B={batch} ctx={ctx} eager", t, batch * ctx * HKV * D * 4)


def bench_prefill(seqs: int = 8, q_len: int = 2048, prefix: int = 0, compare_sdpa: bool = True,
                  tag: str = "") -> float:
    ctx = prefix + q_len
    nb = math.ceil(ctx / BS)
    kc = torch.randn(seqs * nb, BS, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    tables = torch.randperm(seqs * nb, device="cuda").to(torch.int32).view(seqs, nb)
    q = torch.randn(seqs * q_len, HQ, D, device="cuda", dtype=DT)
    cu = torch.arange(0, seqs + 1, device="cuda", dtype=torch.int32) * q_len
    lens = torch.full((seqs,), ctx, device="cuda", dtype=torch.int32)
    fn = lambda: A.prefill_attention(q, kc, vc, tables, cu, lens, D ** -0.5, q_len)
    t = do_bench(fn)
    flops = 4 * D * HQ * seqs * (q_len * (q_len + 1) / 2 + q_len * prefix)
    nbytes = 2 * q.numel() * 2 + seqs * ctx * HKV * D * 4
    report(f"prefill_attention {seqs}x{q_len} prefix={prefix}{tag}", t, nbytes, flops)
    if compare_sdpa and prefix == 0:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qd = torch.randn(seqs, HQ, q_len, D, device="cuda", dtype=DT)
        kd = torch.randn(seqs, HKV, q_len, D, device="cuda", dtype=DT)
        vd = torch.randn_like(kd)
        kr, vr = kd.repeat_interleave(HQ // HKV, 1), vd.repeat_interleave(HQ // HKV, 1)
        try:
            sdpa = torch.nn.functional.scaled_dot_product_attention
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                ts = do_bench(lambda: sdpa(qd, kr, vr, is_causal=True))
            report(f"(torch SDPA flash, dense, {seqs}x{q_len})", ts, None, flops)
        except RuntimeError as e:  # backend not available
            print("  SDPA flash unavailable:", e)
    return t


def bench_store_kv(n: int) -> None:
    kc = torch.randn(8192, BS, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    k = torch.randn(n, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    slots = torch.randperm(8192 * BS, device="cuda")[:n]
    t = do_bench(lambda: A.store_kv(k, v, kc, vc, slots))
    report(f"store_kv N={n} eager", t, 4 * k.numel() * 2)


def bench_router(n: int, reps: int = 16) -> None:
    """The softmax top-k epilogue alone, with its routing write fused in, and followed by the separate write
    kernel (the other routers' path): what routing capture costs one MoE layer per decode step."""
    from routereplay.kernels import router as R

    logits = torch.randn(reps, n, E, device="cuda", dtype=DT)
    cache = torch.zeros(1 << 20, 8, K, dtype=torch.uint8, device="cuda")  # one row per KV slot, 8 MoE layers
    slots = torch.stack([torch.randperm(cache.shape[0] - 1, device="cuda")[:n] for _ in range(reps)])
    variants = {
        "epilogue": lambda i: R.softmax_topk(logits[i], K, True),
        "epilogue + fused write": lambda i: R.softmax_topk(logits[i], K, True, R.RoutingRecord(cache, slots[i], 3)),
        "epilogue, then write kernel": lambda i: R.RoutingRecord(cache, slots[i], 3).write(
            R.softmax_topk(logits[i], K, True)[0]),
    }
    for name, f in variants.items():
        g = graph_of([lambda i=i, f=f: f(i) for i in range(reps)])
        report(f"router N={n} {name} graph", do_bench(g.replay, reps))


# ---------------------------------------------------------------------------------------------- MoE


_WEIGHTS: list[torch.Tensor] = []


def moe_inputs(n: int, reps: int):
    if not _WEIGHTS:  # 1.2 GB of experts, shared by every MoE benchmark
        _WEIGHTS.append(torch.randn(E, 2 * INTER, H, device="cuda", dtype=DT) * H ** -0.5)
        _WEIGHTS.append(torch.randn(E, H, INTER, device="cuda", dtype=DT) * INTER ** -0.5)
    w13, w2 = _WEIGHTS
    xs = torch.randn(reps, n, H, device="cuda", dtype=DT)
    ids = torch.stack([torch.rand(n, E, device="cuda").topk(K, dim=1).indices for _ in range(reps)])
    wts = torch.softmax(torch.randn(reps, n, K, device="cuda"), -1)
    return w13, w2, xs, ids, wts


def moe_bytes(ids: torch.Tensor, n: int) -> float:
    experts = ids.unique().numel()
    return experts * 3 * H * INTER * 2 + 2 * n * H * 2


def bench_moe(n: int, config: dict | None = None, tag: str = "", eager: bool = True) -> float:
    reps = 8
    w13, w2, xs, ids, wts = moe_inputs(n, reps)
    calls = [lambda r=r: M._fused_moe_triton(xs[r], w13, w2, ids[r], wts[r], config=config)
             for r in range(reps)]
    g = graph_of(calls)
    t = do_bench(g.replay, reps)
    nbytes = sum(moe_bytes(ids[r], n) for r in range(reps)) / reps
    flops = 2 * n * K * 3 * H * INTER
    cfg = config or M.moe_config(n, K, E)
    report(f"fused_moe N={n}{tag} graph", t, nbytes, flops, extra=f"bm={cfg['block_m']}")
    if eager:
        te = do_bench(calls[0])
        report(f"fused_moe N={n}{tag} eager", te, moe_bytes(ids[0], n))
    return t


# ---------------------------------------------------------------------------------------------- sweeps


def _cfg(bm: int, gbn: int, gbk: int, dbn: int, dbk: int, w: int, st: int) -> dict:
    return dict(block_m=bm, gu_block_n=gbn, gu_block_k=gbk, down_block_n=dbn, down_block_k=dbk, num_warps=w,
                num_stages=st)


def sweep() -> None:
    print("\n== sweep: decode (BLOCK_N, warps, stages, min split tokens) ==", flush=True)
    base = (A.DECODE_BLOCK_N, A.DECODE_NUM_WARPS, A.DECODE_NUM_STAGES, A.DECODE_MIN_SPLIT_TOKENS)
    for bn, w, st, ms in [(32, 4, 2, 64), (128, 4, 2, 64), (64, 4, 3, 64), (64, 4, 2, 128)]:
        A.DECODE_BLOCK_N, A.DECODE_NUM_WARPS, A.DECODE_NUM_STAGES, A.DECODE_MIN_SPLIT_TOKENS = bn, w, st, ms
        for b, c in [(1, 4096), (128, 4096), (1, 576), (128, 576)]:
            bench_decode(b, c, tag=f" [bn={bn} w={w} st={st} ms={ms}]")
    A.DECODE_BLOCK_N, A.DECODE_NUM_WARPS, A.DECODE_NUM_STAGES, A.DECODE_MIN_SPLIT_TOKENS = base

    print("\n== sweep: fused_moe small-batch tiles ==", flush=True)
    for i, cfg in enumerate([_cfg(16, 64, 128, 64, 128, 4, 4), _cfg(16, 32, 256, 64, 256, 4, 3),
                             _cfg(16, 16, 128, 32, 128, 2, 4), _cfg(32, 32, 128, 64, 128, 4, 4)]):
        for n in (1, 128):
            bench_moe(n, cfg, tag=f" [small#{i}]", eager=False)

    print("\n== sweep: fused_moe large-batch tiles (N=4096) ==", flush=True)
    for i, cfg in enumerate([_cfg(64, 128, 64, 256, 64, 8, 3), _cfg(128, 64, 64, 128, 64, 8, 4)]):
        bench_moe(4096, cfg, tag=f" [large#{i}]", eager=False)

    print("\n== sweep: prefill (BLOCK_M, BLOCK_N, warps, stages) ==", flush=True)
    base = (A.PREFILL_BLOCK_M, A.PREFILL_BLOCK_N, A.PREFILL_NUM_WARPS, A.PREFILL_NUM_STAGES)
    for bm, bn, w, st in [(64, 32, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2)]:
        A.PREFILL_BLOCK_M, A.PREFILL_BLOCK_N, A.PREFILL_NUM_WARPS, A.PREFILL_NUM_STAGES = bm, bn, w, st
        bench_prefill(compare_sdpa=False, tag=f" [bm={bm} bn={bn} w={w} st={st}]")
    A.PREFILL_BLOCK_M, A.PREFILL_BLOCK_N, A.PREFILL_NUM_WARPS, A.PREFILL_NUM_STAGES = base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not A.HAS_TRITON:
        sys.exit("needs a CUDA device and triton")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    measure_copy_bw()
    for b in (1, 128):
        for c in (576, 4096):
            bench_decode(b, c)
    bench_decode(1, 576, table_blocks=40960 // BS, tag=" table=40960")  # CUDA-graph-width block table
    bench_decode_eager(1, 576)
    for n in (1, 2, 8, 128):
        bench_moe(n, eager=n in (1, 128))
    bench_moe(4096, eager=False)
    for n in (1, 128, 1024):
        bench_router(n)
    bench_prefill()
    bench_prefill(seqs=4, q_len=512, prefix=3584, compare_sdpa=False)
    for n in (128, 16384):
        bench_store_kv(n)
    main_rows = list(ROWS)
    if args.sweep:
        sweep()
    print("\n== summary ==")
    print("\n".join(main_rows))


if __name__ == "__main__":
    main()
