"""Tensor parallelism on one host: TP=1 vs TP=N on the same random Qwen3-MoE checkpoint.

Checks greedy tokens and routing agreement (bf16 by default, --dtype float32), then compares throughput.

  python benchmarks/tp.py --tp 2 --layers 4
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch

from benchmarks.throughput import QWEN3_30B_A3B
from routereplay import LLM, SamplingParams
from routereplay.metrics import rollout_router_disagreement


def make_checkpoint(d: str, layers: int) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", **dict(QWEN3_30B_A3B, num_hidden_layers=layers))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(d)
    del model
    torch.cuda.empty_cache()
    return d


def rollouts(d: str, tp: int, prompts: list[list[int]], new_tokens: int, dtype: str) -> tuple[list, float]:
    llm = LLM(d, dtype=dtype, tensor_parallel_size=tp, routing_replay={"enable": True},
              max_num_seqs=len(prompts), max_model_len=1024, gpu_memory_utilization=0.8)
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4), use_tqdm=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    seconds = time.perf_counter() - t
    print(f"TP={tp}: {len(prompts) * new_tokens / seconds:.0f} tok/s", flush=True)
    llm.close()
    del llm
    gc.collect()
    return outs, len(prompts) * new_tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    d = make_checkpoint(tempfile.mkdtemp(), args.layers)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (args.input_len,), generator=g).tolist() for _ in range(args.prompts)]
    one, tps1 = rollouts(d, 1, prompts, args.new_tokens, args.dtype)
    many, tpsn = rollouts(d, args.tp, prompts, args.new_tokens, args.dtype)
    same_seq = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(one, many, strict=True))
    dis = rollout_router_disagreement(one, many)  # rows compare only while both runs forwarded the same tokens
    gpu = torch.cuda.get_device_name()
    print(f"\n## TP=1 vs TP={args.tp}, Qwen3-MoE shape with {args.layers} layers, {args.dtype}, {gpu}\n")
    print(f"identical greedy sequences: {same_seq}/{len(one)}")
    print(f"routing agreement on identical prefixes: {1 - dis.pair_rate:.5f} of {dis.num_tokens} tokens x "
          f"{len(dis.per_layer)} layers (token, layer) sets; tokens with >= 1 layer differing: {dis.token_rate:.4%}")
    print(f"decode+prefill throughput ({args.prompts} x {args.input_len} in / {args.new_tokens} out): "
          f"TP=1 {tps1:.0f} tok/s, TP={args.tp} {tpsn:.0f} tok/s, ratio {tpsn / tps1:.2f}")


if __name__ == "__main__":
    main()
