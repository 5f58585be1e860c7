"""Training/inference mismatch, native routing vs rollout routing replay (R3): the R3 paper's diagnostics.

A random Qwen3-MoE with real widths (hidden 2048, 128 experts, top-8, moe_intermediate 768, vocab
151936, a few layers) is built with transformers and saved as a checkpoint. The routereplay engine
samples rollouts from it in bf16 and records their routing; the transformers model (bf16 by
default) then scores the same rollouts twice: with its own (native) routing and replaying the
rollout routing. Printed as a markdown table: k3 KL, F(2), mean/max |dp| over the generated
tokens, and router disagreement (rollout vs the routing the training forward used) over every
token with a rollout row. ``--rollout-dtype fp8`` adds FP8 rollouts beside the bf16 ones: the same bf16
checkpoint quantized to block-FP8 as the engine loads it (``quantization="fp8"``, the way RL stacks sample
in FP8 from a bf16 trainer), scored by the same bf16 trainer model.

    python benchmarks/mismatch.py                 # one GPU, < 5 minutes
    python benchmarks/mismatch.py --rollout-dtype fp8
    python benchmarks/mismatch.py --tiny          # CPU smoke check (--tiny --rollout-dtype fp8 too)
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import numpy as np
import torch
import transformers

from routereplay import LLM, SamplingParams
from routereplay.demo import stack_routing, tap_routers
from routereplay.metrics import policy_mismatch, router_disagreement
from routereplay.replay import RoutingReplay, align

FULL = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
            num_experts_per_tok=4, moe_intermediate_size=32, vocab_size=512)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# FP8 rollouts: the shipped checkpoints' 128 x 128 blocks; the tiny widths take 16 x 32 (32: the kernels' smallest
# activation group; 16 divides the tiny experts' 32 rows)
FP8 = {False: "fp8", True: {"quant_method": "fp8", "weight_block_size": [16, 32]}}


def build_checkpoint(args: argparse.Namespace, path: str, device: torch.device) -> torch.nn.Module:
    """Random-init Qwen3-MoE on ``device``, saved to ``path``; returns the model (in the training dtype)."""
    widths = TINY if args.tiny else FULL
    extra = {} if args.init_std is None else {"initializer_range": args.init_std}
    config = transformers.Qwen3MoeConfig(
        num_hidden_layers=args.layers, intermediate_size=4 * widths["hidden_size"], decoder_sparse_step=1,
        norm_topk_prob=True, max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
        tie_word_embeddings=False, **widths, **extra,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # a trained model's next-token distributions are peaked, a random one's are flat
        model.lm_head.weight.mul_(args.lm_head_scale)
    model.save_pretrained(path)
    return model.to(device=device, dtype=DTYPES[args.train_dtype]).eval()


def rollouts(args: argparse.Namespace, path: str, vocab: int, fp8: bool) -> list:
    """Engine rollouts in bf16 (weights in bf16, or block-FP8) with routing capture; one sample per prompt, no
    early stop; the same prompts and seeds either way."""
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(3, vocab, size=(args.prompts, args.prompt_len)).tolist()
    blocks = 2 * args.prompts * -(-(args.prompt_len + args.new_tokens) // 16)
    llm = LLM(path, dtype="bfloat16", max_model_len=args.prompt_len + args.new_tokens, num_kv_blocks=blocks,
              block_size=16, seed=args.seed, routing_replay={"enable": True},
              quantization=FP8[args.tiny] if fp8 else None)
    params = [SamplingParams(temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True, seed=args.seed + i)
              for i in range(args.prompts)]
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    llm.close()
    return outputs


Scores = tuple[list, list, list, list]


@torch.no_grad()
def score(model: torch.nn.Module, rr: RoutingReplay, outputs: list, replay: bool, micro_batch: int,
          device: torch.device) -> Scores:
    """Per micro-batch: training log-probs, rollout log-probs, response mask, (routing used, rollout's, mask)."""
    results: Scores = ([], [], [], [])
    for start in range(0, len(outputs), micro_batch):
        chunk = outputs[start : start + micro_batch]
        seqs = [out.prompt_token_ids + out.outputs[0].token_ids for out in chunk]
        lengths = [len(s) - 1 for s in seqs]  # the last token has no routing row and predicts nothing
        batch, seq = len(seqs), max(lengths)
        input_ids = torch.zeros(batch, seq, dtype=torch.long)
        targets = torch.zeros(batch, seq, dtype=torch.long)  # position t predicts token t + 1
        response = torch.zeros(batch, seq, dtype=torch.bool)
        rollout_lp = torch.zeros(batch, seq)
        for i, (s, out) in enumerate(zip(seqs, chunk, strict=True)):
            input_ids[i, : lengths[i]] = torch.tensor(s[:-1])
            targets[i, : lengths[i]] = torch.tensor(s[1:])
            p = len(out.prompt_token_ids)
            response[i, p - 1 : lengths[i]] = True
            rollout_lp[i, p - 1 : lengths[i]] = torch.tensor(out.outputs[0].logprobs)
        routing, mask = align([out.outputs[0].routed_experts for out in chunk], lengths)
        attention_mask = mask.long().to(device)
        with tap_routers(model) as used:
            if replay:
                with rr.replay(routing, mask):
                    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask).logits
            else:
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device)[..., None])[..., 0]
        del logits
        results[0].append(logprobs.cpu())
        results[1].append(rollout_lp)
        results[2].append(response)
        results[3].append((stack_routing(used, batch, seq).cpu(), routing.long(), mask))
    return results


def summarize(results: Scores) -> dict[str, float]:
    train = torch.cat([t.flatten() for t in results[0]])
    rollout = torch.cat([t.flatten() for t in results[1]])
    response = torch.cat([t.flatten() for t in results[2]])
    mismatch = policy_mismatch(train, rollout, response)
    used = torch.cat([u[m] for u, _, m in results[3]])
    stored = torch.cat([r[m] for _, r, m in results[3]])
    dis = router_disagreement(stored, used)
    return dict(k3=mismatch.k3_kl, f2=mismatch.extreme_fraction, mean_dp=mismatch.mean_abs_prob_diff,
                max_dp=mismatch.max_abs_prob_diff, pairs=dis.pair_rate, tokens=dis.token_rate,
                worst_layer=max(dis.per_layer), n_resp=mismatch.num_tokens, n_routed=dis.num_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small widths and sizes: a CPU smoke check")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers (default 4; 2 with --tiny)")
    parser.add_argument("--prompts", type=int, default=None, help="rollouts (default 256; 4 with --tiny)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 64; 16 with --tiny)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 256; 16 with --tiny)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per training forward (%(default)s)")
    parser.add_argument("--train-dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the transformers model (%(default)s); rollouts are always bf16")
    parser.add_argument("--rollout-dtype", choices=["bfloat16", "fp8"], default="bfloat16",
                        help="fp8: FP8-weight rollouts too, beside the bf16 ones (%(default)s)")
    parser.add_argument("--init-std", type=float, default=None, help="initializer_range (transformers default)")
    parser.add_argument("--lm-head-scale", type=float, default=8.0,
                        help="scale the random LM head so distributions are peaked as after training (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name, full, tiny in (("layers", 4, 2), ("prompts", 256, 4), ("prompt_len", 64, 16), ("new_tokens", 256, 16)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.tiny:
        torch.set_num_threads(1)
    device = torch.device(args.device)
    timings = {}
    with tempfile.TemporaryDirectory(prefix="rr-mismatch-") as path:
        start = time.perf_counter()
        model = build_checkpoint(args, path, device)
        rr = RoutingReplay(model)
        timings["build + save"] = time.perf_counter() - start
        outputs = {}
        for rollout in ("bf16", "fp8") if args.rollout_dtype == "fp8" else ("bf16",):
            start = time.perf_counter()
            outputs[rollout] = rollouts(args, path, model.config.vocab_size, rollout == "fp8")
            timings[f"engine load + {rollout} rollouts"] = time.perf_counter() - start
            gc.collect()  # the engine's weights and caches
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = {}
    for rollout, outs in outputs.items():
        for name, replay in (("native", False), ("replay (R3)", True)):
            start = time.perf_counter()
            rows[rollout, name] = summarize(score(model, rr, outs, replay, args.micro_batch, device))
            timings[f"score {rollout} {name}"] = time.perf_counter() - start
    widths = TINY if args.tiny else FULL
    print(f"\nQwen3-MoE random init: {args.layers} MoE layers, hidden {widths['hidden_size']}, "
          f"{widths['num_experts']} experts top-{widths['num_experts_per_tok']}, vocab {widths['vocab_size']}; "
          f"{args.prompts} rollouts x ({args.prompt_len} prompt + {args.new_tokens} new) tokens; rollouts: engine "
          f"on {args.device} in bf16 (weights: {' and '.join(outputs)}), training: transformers {args.train_dtype}\n")
    print("| rollout weights | training routing | k3 KL | F(2) (tokens) | mean \\|dp\\| | max \\|dp\\| "
          "| router disagreement (pairs) | tokens differing in >= 1 layer | worst layer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (rollout, name), r in rows.items():
        extreme = round(r["f2"] * r["n_resp"])
        print(f"| {rollout} | {name} | {r['k3']:.3e} | {r['f2']:.2e} ({extreme}) | {r['mean_dp']:.2e} "
              f"| {r['max_dp']:.2e} | {r['pairs']:.2%} | {r['tokens']:.2%} | {r['worst_layer']:.2%} |")
    first = next(iter(rows.values()))
    print(f"\n{first['n_resp']} generated tokens (KL, F, dp); {first['n_routed']} tokens with a rollout routing row "
          f"(disagreement)")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
