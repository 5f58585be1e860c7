"""Weight sync from a trainer's `named_parameters()`. Prints seconds and GB/s of trainer-side bytes per sync.

Default: `LLM.update_weights` in one process, TP=1 vs TP=N (under tensor parallelism rank 0 broadcasts
every tensor to the workers, NCCL on GPUs, gloo on CPU, and each rank writes its shard).
`--from-trainer`: the trainer is another process (GPU 1, or the CPU) that broadcasts over its own
process group, as `/update_weights_from_distributed` receives it (`routereplay.weight_sync`).

    python benchmarks/weight_sync.py --tp 2 --layers 8            # GPUs: Qwen3-30B-A3B widths, bf16
    python benchmarks/weight_sync.py --from-trainer --layers 8    # 2 GPUs: trainer on GPU 1, NCCL
    python benchmarks/weight_sync.py --tp 2 --tiny --device cpu   # CPU, small widths, fp32
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp
import transformers

from benchmarks.throughput import QWEN3_30B_A3B
from routereplay import LLM
from routereplay.weight_sync import make_group

TINY = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=64,
            num_experts_per_tok=8, moe_intermediate_size=256, intermediate_size=1024, vocab_size=8192,
            tie_word_embeddings=False, max_position_embeddings=512)


def _trainer(config: dict, dtype: torch.dtype, device: str, port: int, repeats: int) -> None:
    """A separate trainer process: its own model, rank 0 of the weight-sync group, broadcasts every tensor."""
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**config), dtype=dtype)
    group = make_group("127.0.0.1", port, 0, 2, "bench", "nccl" if device.startswith("cuda") else "gloo")
    for _ in range(repeats):
        for _, p in model.named_parameters():
            group.broadcast(p.detach(), 0).wait()
    group.broadcast(torch.zeros(1, device=device), 1).wait()  # the engine is done: both shut down
    group.shutdown()


def from_trainer(args: argparse.Namespace, config: dict, dtype: torch.dtype, path: str, named: list, gb: float) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trainer_device = "cuda:1" if args.device == "cuda" else "cpu"
    proc = mp.get_context("spawn").Process(target=_trainer, args=(config, dtype, trainer_device, port, args.repeats))
    proc.start()
    llm = LLM(path, dtype=str(dtype).removeprefix("torch."), device=args.device, max_model_len=256,
              num_kv_blocks=64, enforce_eager=True)
    group = make_group("127.0.0.1", port, 1, 2, "bench", "nccl" if args.device == "cuda" else "gloo")
    names, dtypes, shapes = [n for n, _ in named], [p.dtype for _, p in named], [list(p.shape) for _, p in named]
    seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        llm.engine.receive_weights(group, names, dtypes, shapes)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    group.broadcast(torch.zeros(1, device=llm.engine.runner.device), 1).wait()
    group.shutdown()  # before the trainer, which hosts the store, exits
    proc.join()
    llm.close()
    best = min(seconds)
    print(f"trainer on {trainer_device} -> engine on {args.device}: receive + load {best:.3f} s "
          f"(best of {args.repeats}) = {gb / best:.1f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--from-trainer", action="store_true", help="the trainer is another process (GPU 1 or CPU)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    widths = TINY if args.tiny else QWEN3_30B_A3B
    config = {**widths, "num_hidden_layers": args.layers}
    cfg = transformers.Qwen3MoeConfig(**config)
    with torch.device(args.device):  # the trainer's model: its tensors live where training runs
        trainer = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    path = tempfile.mkdtemp(prefix="rr-sync-")
    trainer.save_pretrained(path)
    named = [(n, p.detach()) for n, p in trainer.named_parameters()]
    gb = sum(p.numel() * p.element_size() for _, p in named) / 1e9
    print(f"Qwen3-MoE {args.layers} layers, hidden {widths['hidden_size']}, {widths['num_experts']} experts; "
          f"{len(named)} tensors, {gb:.2f} GB {dtype} on {args.device}")
    if args.from_trainer:
        return from_trainer(args, config, dtype, path, named, gb)
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
