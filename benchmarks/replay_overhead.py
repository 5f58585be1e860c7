"""Cost of routing replay in a training step: forward + backward with native routing vs. with replay.

A Qwen3-MoE transformers model with real widths (hidden 2048, 128 experts, top-8,
moe_intermediate 768, bf16, random init) and a few layers. The replayed routing is the model's own
native routing recorded beforehand, so both arms run the same expert load and only the replay
machinery differs; it is handed to ``replay()`` as a host uint8 tensor each step, as a trainer
would after ``align``. Steps alternate native / replay so drift hits both arms alike; the ratio of
the medians is printed (target <= 1.03).

    python benchmarks/replay_overhead.py                    # CUDA
    python benchmarks/replay_overhead.py --device cpu --tiny  # smoke check
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from routereplay.replay import RoutingReplay


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if args.tiny:
        widths = dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        )
    else:
        widths = dict(
            hidden_size=2048,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
        )
    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        num_hidden_layers=args.layers,
        intermediate_size=4 * widths["hidden_size"],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        max_position_embeddings=max(4096, args.seq),
        **widths,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).train()


def time_step(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one step, measured with CUDA events on GPU (wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    step()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny widths, for a CPU smoke check")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4, tiny 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048, tiny 32)")
    parser.add_argument(
        "--vocab", type=int, default=4096, help="small, so the lm head does not hide the MoE cost"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per arm (default 3, tiny 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per arm (default 20, tiny 3)")
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 2048)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.repeats = args.repeats or (3 if args.tiny else 20)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, device, dtype)
    rr = RoutingReplay(model)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    with torch.no_grad(), rr.record() as record:
        model(input_ids, use_cache=False)
    routing = record.routing.to(torch.uint8).cpu()
    if device.type == "cuda":
        routing = routing.pin_memory()

    def native_step() -> None:
        model(input_ids, labels=input_ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    def replay_step() -> None:
        with rr.replay(routing):
            model(input_ids, labels=input_ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        native_step()
        replay_step()
    native_s, replay_s = [], []
    for _ in range(args.repeats):
        native_s.append(time_step(native_step, device))
        replay_s.append(time_step(replay_step, device))

    native_median, replay_median = statistics.median(native_s), statistics.median(replay_s)
    print(
        f"device={device} dtype={dtype} layers={args.layers} experts={rr.num_experts} top_k={rr.top_k} "
        f"tokens/step={args.batch * args.seq} experts_impl={model.config._experts_implementation}"
    )
    print(f"native fwd+bwd  median {native_median * 1e3:9.2f} ms  (n={len(native_s)})")
    print(f"replay fwd+bwd  median {replay_median * 1e3:9.2f} ms  (n={len(replay_s)})")
    print(f"ratio replay/native = {replay_median / native_median:.4f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
