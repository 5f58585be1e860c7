"""Rollout throughput on one GPU, side by side in ONE run:

  this engine (capture on / off) vs transformers' `generate` on the same weights, and the HBM
  roofline bound of a decode step. The model is Qwen3-30B-A3B's exact shape with random bf16
  weights made on the GPU (no download); transformers' model shares our weight tensors.

  python benchmarks/throughput.py --num-requests 128 --input-len 512 --output-len 512
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch

from routereplay import LLM, SamplingParams

QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
    tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
)
HBM_BYTES_PER_S = 4.26e12  # device-to-device copy measured on the H200


def write_config(d: str, cfg: dict) -> str:
    from transformers import AutoConfig

    AutoConfig.for_model("qwen3_moe", **cfg).save_pretrained(d)
    return d


def roofline_ms(c: dict, batch: int, context: int) -> float:
    """Fewest bytes a decode step must move / HBM bandwidth: every weight it touches once, plus the KV it reads."""
    h, layers, e, k = c["hidden_size"], c["num_hidden_layers"], c["num_experts"], c["num_experts_per_tok"]
    qd, kvd = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    attn = h * qd * 2 + h * kvd * 2
    experts_touched = e * (1 - (1 - k / e) ** batch)
    expert = 3 * h * c["moe_intermediate_size"]
    weights = layers * (attn + h * e + experts_touched * expert + 2 * h) + c["vocab_size"] * h + batch * h
    kv = batch * context * layers * 2 * kvd
    return (weights + kv) * 2 / HBM_BYTES_PER_S * 1e3


def run_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    """Drive the engine step by step; time every step (the sampled tokens are read back each step)."""
    eng = llm.engine
    sp = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=0)
    for p in prompts:
        eng.add_request(p, sp)
    decode_ms, full = [], []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while eng.has_unfinished():
        running = len(eng.scheduler.running)
        waiting = len(eng.scheduler.waiting)
        s = time.perf_counter()
        done += len(eng.step())
        dt = (time.perf_counter() - s) * 1e3
        if waiting == 0 and running == len(prompts):
            decode_ms.append(dt)  # every request in flight and decoding
        full.append(dt)
    total = time.perf_counter() - t0
    decode_ms.sort()
    return dict(seconds=total, out_tok_s=len(prompts) * output_len / total,
                decode_ms=decode_ms[len(decode_ms) // 2] if decode_ms else float("nan"), steps=len(full))


def set_capture(llm: LLM, enable: bool) -> None:
    """Benchmark-only switch: drop or restore the routing cache and recapture the decode graphs."""
    runner = llm.engine.runner
    llm.engine.config.routing_replay.enable = enable
    if enable and runner.routing_cache is None:
        runner.routing_cache = runner._saved_routing_cache
    elif not enable and runner.routing_cache is not None:
        runner._saved_routing_cache, runner.routing_cache = runner.routing_cache, None
    runner.graphs.clear()
    torch.cuda.synchronize()
    runner._capture_graphs()


def share_weights_with_transformers(llm: LLM, model_dir: str):
    """A transformers Qwen3-MoE whose parameters ARE our tensors (same names, same layouts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    ours = dict(llm.engine.runner.model.state_dict(keep_vars=True))
    for name, _ in list(hf.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        hf.get_submodule(mod_name)._parameters[attr] = torch.nn.Parameter(ours[name].data, requires_grad=False)
    rot = hf.model.rotary_emb
    hf.model.rotary_emb = type(rot)(cfg, device="cuda")
    return hf.eval()


@torch.inference_mode()
def hf_step_ms(hf, batch: int, input_len: int, new_tokens: int) -> float:
    """ms per decode step of transformers' generate (static batch): (t(1 + n) - t(1)) / n."""
    ids = torch.randint(1000, 100000, (batch, input_len), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)
    return (timed(1 + new_tokens) - timed(1)) / new_tokens * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--hf-new-tokens", type=int, default=8)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--prefill-seqs", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    c = dict(QWEN3_30B_A3B, **({"num_hidden_layers": args.layers} if args.layers else {}))
    d = write_config(tempfile.mkdtemp(), c)
    ctx_len = args.input_len + args.output_len
    t = time.perf_counter()
    llm = LLM(d, load_format="dummy", dtype="bfloat16", routing_replay={"enable": True},
              max_num_seqs=max(args.num_requests, args.prefill_seqs), max_model_len=max(ctx_len, args.prefill_len) + 16,
              max_num_batched_tokens=args.prefill_seqs * args.prefill_len, gpu_memory_utilization=0.85)
    runner = llm.engine.runner
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, start_s=time.perf_counter() - t,
               graph_capture_s=runner.graph_capture_seconds, kv_blocks=runner.num_blocks)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (args.input_len,), generator=g).tolist() for _ in range(args.num_requests)]

    # prefill: 8 x 2048 new tokens in one step
    pre = [torch.randint(1000, 100000, (args.prefill_len,), generator=g).tolist() for _ in range(args.prefill_seqs)]
    run_engine(llm, pre[:1], 2)  # warm-up (Triton compilation)
    eng = llm.engine
    for p in pre:
        eng.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    s = time.perf_counter()
    eng.step()
    prefill_s = time.perf_counter() - s
    while eng.has_unfinished():
        eng.step()
    active = 3 * c["hidden_size"] * c["moe_intermediate_size"] * c["num_experts_per_tok"] + 2 * c["hidden_size"] * (
        c["num_attention_heads"] + c["num_key_value_heads"]) * c["head_dim"]
    flops = 2 * args.prefill_seqs * args.prefill_len * c["num_hidden_layers"] * active
    attn = 2 * 2 * args.prefill_seqs * args.prefill_len ** 2 / 2 * c["num_attention_heads"] * c["head_dim"]
    flops += attn * c["num_hidden_layers"]
    res["prefill"] = dict(seconds=prefill_s, tflops=flops / prefill_s / 1e12, flop_count=flops)
    print(f"start-up and prefill: {res}", flush=True)

    # decode at batch 1 and at num_requests, capture on and off interleaved
    res["bs1_on"] = run_engine(llm, prompts[:1], 64)
    for mode in ("on", "off", "on", "off"):
        set_capture(llm, mode == "on")
        r = run_engine(llm, prompts, args.output_len)
        print(f"capture {mode}: {r}", flush=True)
        res.setdefault(f"batch_{mode}", []).append(r)
    set_capture(llm, True)
    on = max(r["out_tok_s"] for r in res["batch_on"])
    off = max(r["out_tok_s"] for r in res["batch_off"])
    res["capture_ratio"] = on / off
    mc = llm.engine.model_config
    res["routing_bytes_per_token"] = mc.num_moe_layers * mc.top_k * mc.routing_dtype.itemsize
    res["roofline_bs1_ms"] = roofline_ms(c, 1, args.input_len + 64)
    res["roofline_batch_ms"] = roofline_ms(c, args.num_requests, args.input_len + args.output_len // 2)

    if not args.skip_hf:
        hf = share_weights_with_transformers(llm, d)
        set_capture(llm, False)
        llm.engine.runner.graphs.clear()
        gc.collect()
        torch.cuda.empty_cache()
        res["hf_bs1_ms"] = hf_step_ms(hf, 1, args.input_len, 16)
        res["hf_batch_ms"] = hf_step_ms(hf, args.num_requests, args.input_len, args.hf_new_tokens)

    b = min(res["batch_on"], key=lambda r: r["decode_ms"])
    bs1 = res["bs1_on"]
    print(f"\n## {res['gpu']}, torch {res['torch']}, Qwen3-30B-A3B shape ({c['num_hidden_layers']} layers), bf16\n")
    print(f"start-up {res['start_s']:.1f} s (CUDA graph capture {res['graph_capture_s']:.1f} s), "
          f"{res['kv_blocks']} KV blocks\n")
    print("| metric | this engine | transformers generate | HBM bound | engine / bound |")
    print("| --- | --- | --- | --- | --- |")
    hf1, hfb = res.get("hf_bs1_ms", float("nan")), res.get("hf_batch_ms", float("nan"))
    print(f"| decode step, 1 request (ms) | {bs1['decode_ms']:.2f} | {hf1:.1f} | {res['roofline_bs1_ms']:.2f} | "
          f"{bs1['decode_ms'] / res['roofline_bs1_ms']:.2f}x |")
    print(f"| decode step, {args.num_requests} requests (ms) | {b['decode_ms']:.2f} | {hfb:.1f} | "
          f"{res['roofline_batch_ms']:.2f} | {b['decode_ms'] / res['roofline_batch_ms']:.2f}x |")
    print(f"| output tok/s, {args.num_requests} requests ({args.input_len} in / {args.output_len} out) | "
          f"{b['out_tok_s']:.0f} | {args.num_requests / hfb * 1e3:.0f} (decode only) | | |")
    runs = {m: [round(r["out_tok_s"]) for r in res[f"batch_{m}"]] for m in ("on", "off")}
    print(f"\ncapture on / off throughput: {res['capture_ratio']:.4f} (tok/s on {runs['on']}, off {runs['off']})")
    print(f"routing bytes per token: {res['routing_bytes_per_token']} "
          f"({mc.num_moe_layers} MoE layers x top-{mc.top_k} x {mc.routing_dtype})")
    print(f"prefill {args.prefill_seqs} x {args.prefill_len}: {res['prefill']['seconds'] * 1e3:.0f} ms, "
          f"{res['prefill']['tflops']:.0f} TFLOP/s ({res['prefill']['flop_count'] / 1e12:.1f} TFLOP: 2 x active "
          f"params x tokens + causal attention)")
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
