"""Weight sync (`LLM.update_weights`) from a trainer's `named_parameters()`: TP=1 vs TP=N, one process.

Under tensor parallelism rank 0 broadcasts every tensor to the workers (NCCL on GPUs, gloo on CPU)
and each rank writes its shard. Prints seconds and GB/s of trainer-side bytes per sync.

    python benchmarks/weight_sync.py --tp 2 --layers 8            # GPUs: Qwen3-30B-A3B widths, bf16
    python benchmarks/weight_sync.py --tp 2 --tiny --device cpu   # CPU, small widths, fp32
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

from benchmarks.throughput import QWEN3_30B_A3B
from routereplay import LLM

TINY = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=64,
            num_experts_per_tok=8, moe_intermediate_size=256, intermediate_size=1024, vocab_size=8192,
            tie_word_embeddings=False, max_position_embeddings=512)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    widths = TINY if args.tiny else QWEN3_30B_A3B
    cfg = transformers.Qwen3MoeConfig(**{**widths, "num_hidden_layers": args.layers})
    with torch.device(args.device):  # the trainer's model: its tensors live where training runs
        trainer = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    path = tempfile.mkdtemp(prefix="rr-sync-")
    trainer.save_pretrained(path)
    named = [(n, p.detach()) for n, p in trainer.named_parameters()]
    gb = sum(p.numel() * p.element_size() for _, p in named) / 1e9
    print(f"Qwen3-MoE {args.layers} layers, hidden {widths['hidden_size']}, {widths['num_experts']} experts; "
          f"{len(named)} tensors, {gb:.2f} GB {dtype} on {args.device}")
    for tp in sorted({1, args.tp}):
        llm = LLM(path, dtype=str(dtype).removeprefix("torch."), device=args.device, tensor_parallel_size=tp,
                  max_model_len=256, num_kv_blocks=64, enforce_eager=True)
        seconds = []
        for _ in range(args.repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            llm.update_weights(named)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
        llm.close()
        best = min(seconds)
        print(f"TP={tp}: update_weights {best:.3f} s (best of {args.repeats}) = {gb / best:.1f} GB/s")


if __name__ == "__main__":
    main()
