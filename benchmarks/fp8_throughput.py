"""Rollout throughput with block-FP8 weights beside bf16, in ONE run on one GPU.

The same random Qwen3-30B-A3B-shaped model (dummy weights, benchmarks/throughput.py's shape) is served twice by
this engine, routing capture on: bf16 weights, then FP8 weights (``quantization="fp8"``: e4m3 with 128 x 128
block scales, activations quantized per token group of 128, routers and LM head in bf16; the Triton FP8 GEMMs
and fused MoE). Printed side by side: weight bytes, a prefill step, the decode step at 1 and at N requests and
the output tokens/s.

  python -m benchmarks.fp8_throughput --num-requests 128 --input-len 512 --output-len 512
  python -m benchmarks.fp8_throughput --tiny        # CPU smoke check (the PyTorch reference path)
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch

from benchmarks.throughput import QWEN3_30B_A3B, write_config
from routereplay import LLM, SamplingParams

# --tiny: every width a multiple of 128, so the default 128 x 128 blocks apply as on the real shape
TINY = dict(QWEN3_30B_A3B, vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
            num_experts_per_tok=4, max_position_embeddings=4096)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    """Every request generates output_len tokens; the median step while all of them decode, and tokens/s."""
    eng = llm.engine
    sp = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=0)
    for p in prompts:
        eng.add_request(p, sp)
    steps = []
    sync()
    t0 = time.perf_counter()
    while eng.has_unfinished():
        st = eng.stats()
        all_decoding = not st["waiting"] and st["running"] == len(prompts)
        s = time.perf_counter()
        eng.step()
        if all_decoding:
            steps.append((time.perf_counter() - s) * 1e3)
    total = time.perf_counter() - t0
    steps.sort()
    return dict(decode_ms=steps[len(steps) // 2] if steps else float("nan"),
                out_tok_s=len(prompts) * output_len / total)


def prefill_s(llm: LLM, prompts: list[list[int]]) -> float:
    """One step that prefills every prompt (the batch fits max_num_batched_tokens)."""
    eng = llm.engine
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True))
    sync()
    s = time.perf_counter()
    eng.step()
    sync()
    elapsed = time.perf_counter() - s
    while eng.has_unfinished():
        eng.step()
    return elapsed


def measure(model_dir: str, quantization: str | None, args: argparse.Namespace, prompts, pre) -> dict:
    kv = {} if torch.cuda.is_available() else {"device": "cpu", "num_kv_blocks": 64 * len(prompts) + 64}
    t = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", quantization=quantization,
              routing_replay={"enable": True}, max_num_seqs=max(args.num_requests, args.prefill_seqs),
              max_model_len=max(args.input_len + args.output_len, args.prefill_len) + 16,
              max_num_batched_tokens=args.prefill_seqs * args.prefill_len, gpu_memory_utilization=0.85, **kv)
    try:
        model = llm.engine.runner.model
        res = dict(start_s=time.perf_counter() - t, kv_blocks=llm.engine.runner.num_blocks,
                   weight_gb=sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 1e9)
        decode(llm, prompts[:1], 2)  # warm-up (Triton compilation)
        res["prefill_s"] = prefill_s(llm, pre)
        res["bs1"] = decode(llm, prompts[:1], args.bs1_tokens)
        res["batch"] = decode(llm, prompts, args.output_len)
    finally:
        llm.close()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{quantization or 'bf16'}: {res}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small widths and sizes: a CPU smoke check")
    ap.add_argument("--num-requests", type=int, default=None, help="decoding together (default 128; 4 with --tiny)")
    ap.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 512; 16 with --tiny)")
    ap.add_argument("--output-len", type=int, default=None, help="generated tokens (default 512; 8 with --tiny)")
    ap.add_argument("--bs1-tokens", type=int, default=None, help="tokens of the 1-request run (64; 8 with --tiny)")
    ap.add_argument("--prefill-seqs", type=int, default=None, help="prompts of the prefill step (8; 2 with --tiny)")
    ap.add_argument("--prefill-len", type=int, default=None, help="their length (2048; 32 with --tiny)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    defaults = dict(num_requests=(128, 4), input_len=(512, 16), output_len=(512, 8), bs1_tokens=(64, 8),
                    prefill_seqs=(8, 2), prefill_len=(2048, 32))
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    c = dict(TINY if args.tiny else QWEN3_30B_A3B, **({"num_hidden_layers": args.layers} if args.layers else {}))
    d = write_config(tempfile.mkdtemp(), c)
    g = torch.Generator().manual_seed(0)
    vocab = c["vocab_size"]
    prompts = [torch.randint(3, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.num_requests)]
    pre = [torch.randint(3, vocab, (args.prefill_len,), generator=g).tolist() for _ in range(args.prefill_seqs)]
    res = {name: measure(d, q, args, prompts, pre) for name, q in (("bf16", None), ("fp8", "fp8"))}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n## {device}, torch {torch.__version__}, Qwen3-30B-A3B shape{' (tiny)' if args.tiny else ''} "
          f"({c['num_hidden_layers']} layers), bf16 activations, routing capture on\n")
    print("| metric | bf16 weights | FP8 weights | FP8 / bf16 |")
    print("| --- | --- | --- | --- |")
    b, f = res["bf16"], res["fp8"]
    rows = [("weights (GB)", b["weight_gb"], f["weight_gb"]),
            (f"prefill {args.prefill_seqs} x {args.prefill_len} (ms)", b["prefill_s"] * 1e3, f["prefill_s"] * 1e3),
            ("decode step, 1 request (ms)", b["bs1"]["decode_ms"], f["bs1"]["decode_ms"]),
            (f"decode step, {args.num_requests} requests (ms)", b["batch"]["decode_ms"], f["batch"]["decode_ms"]),
            (f"output tok/s, {args.num_requests} requests ({args.input_len} in / {args.output_len} out)",
             b["batch"]["out_tok_s"], f["batch"]["out_tok_s"])]
    for name, x, y in rows:
        print(f"| {name} | {x:.4g} | {y:.4g} | {y / x:.3f} |")
    print(f"\nKV blocks: bf16 {b['kv_blocks']}, FP8 {f['kv_blocks']}; start-up: bf16 {b['start_s']:.1f} s, "
          f"FP8 {f['start_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
