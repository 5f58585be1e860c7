"""Where a decode step's time goes: torch profiler over steady-state decode steps of the
Qwen3-30B-A3B-shaped engine, at given batch sizes (kernel table + host-vs-device time).

  python benchmarks/profile_decode.py --batch 1 128
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.throughput import QWEN3_30B_A3B, write_config
from routereplay import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--trace", default=None, help="write a chrome trace per batch size here (prefix)")
    args = ap.parse_args()
    cfg = dict(QWEN3_30B_A3B, **({"num_hidden_layers": args.layers} if args.layers else {}))
    d = write_config(tempfile.mkdtemp(), cfg)
    llm = LLM(d, load_format="dummy", dtype="bfloat16", routing_replay={"enable": True},
              max_num_seqs=max(args.batch), max_model_len=args.input_len + 4 * args.steps + 64,
              gpu_memory_utilization=0.85)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    for bs in args.batch:
        sp = SamplingParams(temperature=1.0, max_tokens=4 * args.steps, ignore_eos=True, seed=0)
        for _ in range(bs):
            eng.add_request(torch.randint(1000, 100000, (args.input_len,), generator=g).tolist(), sp)
        while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
            eng.step()
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / args.steps * 1e3
        events = prof.key_averages()
        gpu_total = sum(e.self_device_time_total for e in events) / args.steps / 1e3
        print(f"\n### batch {bs}: {wall:.2f} ms per step wall, {gpu_total:.2f} ms of GPU kernels per step\n")
        print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(f"{args.trace}_bs{bs}.json")
        while eng.has_unfinished():
            eng.step()


if __name__ == "__main__":
    main()
