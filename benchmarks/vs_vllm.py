"""This engine and vLLM side by side on the same saved weights, each in its own process.

  python benchmarks/vs_vllm.py write --dir /tmp/ckpt --layers 8         # transformers writes the checkpoint
  python benchmarks/vs_vllm.py run --engine routereplay --dir /tmp/ckpt --json ours.json
  PYTHONPATH=/tmp/site python benchmarks/vs_vllm.py run --engine vllm --dir /tmp/ckpt --json vllm.json
  python benchmarks/vs_vllm.py table ours.json vllm.json [ours_off.json vllm_off.json]
  python benchmarks/vs_vllm.py onoff --dir /tmp/ckpt --json onoff.json  # this engine's routing on / off, one process

The checkpoint is Qwen3-30B-A3B's width (128 experts, top-8) with fewer layers, random weights from
transformers' own initialisation, saved by ``save_pretrained``: both engines read the same safetensors files
(vLLM's dummy weights are uniform in +-1e-3 and route differently, so its dummy speed is not comparable).
Every request's routing is returned (``--routing on``) or capture is off engine-wide (``--routing off``,
vLLM's ``enable_return_routed_experts=False``). Rows, all temperature 1.0 with ``ignore_eos`` so both engines
generate exactly the same number of tokens:

  a  128 prompts x 512 in / 512 out (run twice: the first pass in the process, then the second)
  b  RL: 64 prompts x 16 samples (n=16), 1,024 in / 4,096 out
  c  512 prompts x 256 in / 2,048 out
  d  batch 1, 512 in: ms per output token after the first, (t(1 + n) - t(1)) / n
  agree  greedy: 32 prompts x 256 in / 128 out; routing saved for the comparison in ``table``

tok/s = generated tokens / wall time of one ``LLM.generate`` call holding every request of the row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROWS = {  # prompts, samples per prompt, input tokens, output tokens
    "a": (128, 1, 512, 512),
    "b": (64, 16, 1024, 4096),
    "c": (512, 1, 256, 2048),
}
AGREE = (32, 256, 128)
BS1 = (512, 256)
MAX_MODEL_LEN = 1024 + 4096 + 16
MAX_NUM_SEQS = 1024
MAX_BATCHED_TOKENS = 8192
QWEN3_30B_A3B_WIDTH = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    decoder_sparse_step=1, mlp_only_layers=[],
)


def write(args) -> None:
    """A Qwen3-MoE checkpoint written by transformers (initialised on the GPU when there is one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=args.layers, **QWEN3_30B_A3B_WIDTH)
    cfg.architectures = ["Qwen3MoeForCausalLM"]  # without it vLLM takes the model for a pooling model
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.dir, max_shard_size="4GB")
    print(f"wrote {args.layers}-layer checkpoint to {args.dir} in {time.perf_counter() - t:.1f} s", flush=True)


VOCAB = (1000, 100000)  # prompt token ids are drawn from this range


def prompts_for(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(*VOCAB, size=(n, length)).tolist()


class Ours:
    name = "routereplay"

    def __init__(self, model_dir: str, routing: bool, util: float, **engine_args) -> None:
        from routereplay import LLM

        self.llm = LLM(model_dir, dtype="bfloat16", routing_replay={"enable": routing},
                       max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN,
                       max_num_batched_tokens=MAX_BATCHED_TOKENS, gpu_memory_utilization=util, **engine_args)
        self.routing = self.returning = routing  # returning: this call's requests ask for their routing
        # the profile of a row (instance attributes shadow the engine's methods): engine steps; forward time of
        # pure decode steps and of steps that carry prompt tokens (runner.run returns sampled tokens to the host,
        # so it ends with the GPU work); tokens forwarded (prefix-cache hits are not); host time in the routing
        # return (the gather launch, then delivering arrays once their copies have landed)
        eng = self.llm.engine
        self._reset()
        for name in ("step", "_gather_routing", "_collect"):
            setattr(eng, name, self._profiled(name, getattr(eng, name)))
        run = eng.runner.run

        def timed_run(batch):
            t = time.perf_counter()
            out = run(batch)
            kind = "decode" if all(n == 1 for _, n in batch) else "prefill"
            self.prof[f"{kind}_s"] += time.perf_counter() - t
            self.prof[f"{kind}_steps"] += 1
            self.prof["forwarded_tokens"] += sum(n for _, n in batch)
            return out
        eng.runner.run = timed_run

    def _reset(self) -> dict:
        keys = ("steps", "decode_steps", "prefill_steps", "forwarded_tokens", "decode_s", "prefill_s", "routing_host_s")
        p, self.prof = getattr(self, "prof", None), dict.fromkeys(keys, 0)
        return p

    def _profiled(self, name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if name == "step":
                    self.prof["steps"] += 1
                else:
                    self.prof["routing_host_s"] += time.perf_counter() - t
        return call

    def profile(self, seconds: float) -> dict:
        p = self._reset()
        return dict(steps=p["steps"], ms_per_step=round(seconds / max(p["steps"], 1) * 1e3, 3),
                    decode_steps=p["decode_steps"], decode_ms_per_step=round(p["decode_s"] / max(p["decode_steps"], 1)
                                                                             * 1e3, 3),
                    prefill_steps=p["prefill_steps"], prefill_s=round(p["prefill_s"], 4),
                    forwarded_tokens=p["forwarded_tokens"], routing_host_s=round(p["routing_host_s"], 4))

    def version(self) -> str:
        import routereplay

        return getattr(routereplay, "__version__", "main")

    def generate(self, prompts, n, max_tokens, temperature):
        from routereplay import SamplingParams

        sp = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                            return_routed_experts=self.returning)
        outs = self.llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
        return [[(c.token_ids, c.routed_experts) for c in o.outputs] for o in outs]


class VLLM:
    name = "vllm"

    def __init__(self, model_dir: str, routing: bool, util: float) -> None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not installed beside it
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # a failed run frees the GPU with the process
        from vllm import LLM

        self.llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16", runner="generate",
                       enable_return_routed_experts=routing, max_num_seqs=MAX_NUM_SEQS,
                       max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=MAX_BATCHED_TOKENS,
                       gpu_memory_utilization=util, enable_prefix_caching=True)
        self.routing = self.returning = routing  # per engine in vLLM: every request or none

    def version(self) -> str:
        import vllm

        return vllm.__version__

    def generate(self, prompts, n, max_tokens, temperature):
        from vllm import SamplingParams

        sp = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [[(list(c.token_ids), getattr(c, "routed_experts", None)) for c in o.outputs] for o in outs]

    def profile(self, seconds: float) -> None:
        return None


def triton_cache_entries() -> int:
    """Kernels Triton has compiled into its on-disk cache (one folder each): growth during a pass = JIT work."""
    d = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(engine, prompts, n, max_tokens, temperature=1.0) -> tuple[float, list, int]:
    sync()
    compiled = triton_cache_entries()
    t = time.perf_counter()
    outs = engine.generate(prompts, n, max_tokens, temperature)
    sync()
    seconds = time.perf_counter() - t
    tokens = sum(len(ids) for o in outs for ids, _ in o)
    expected = len(prompts) * n * max_tokens
    if tokens != expected:
        raise RuntimeError(f"{engine.name} generated {tokens} tokens, expected {expected}")
    if engine.returning:
        missing = sum(r is None for o in outs for _, r in o)
        if missing:
            raise RuntimeError(f"{engine.name}: {missing} outputs without routed_experts")
    return seconds, outs, triton_cache_entries() - compiled


def row_shape(row: str, output_scale: float) -> tuple[int, int, int, int]:
    """ROWS[row], row b's output length times ``output_scale``."""
    num, n, inp, out = ROWS[row]
    return num, n, inp, int(out * output_scale) if row == "b" else out


def abba(pairs: int) -> list[bool]:
    """False, True, True, False, ... (``pairs`` of each): a linear drift within the process cancels."""
    return [x for i in range(pairs) for x in ((False, True) if i % 2 == 0 else (True, False))]


def smoke() -> None:
    """A CPU check of the script itself: every row, tiny shapes."""
    global MAX_MODEL_LEN, MAX_NUM_SEQS, AGREE, BS1, VOCAB
    VOCAB = (3, 100)
    ROWS.update(a=(4, 1, 8, 8), b=(2, 4, 16, 16), c=(8, 1, 8, 12))
    AGREE, BS1, MAX_MODEL_LEN, MAX_NUM_SEQS = (3, 8, 8), (8, 8), 64, 16


def run(args) -> None:
    import torch

    if args.smoke:
        smoke()
    t0 = time.perf_counter()
    routing = args.routing == "on"
    engine = (Ours if args.engine == "routereplay" else VLLM)(args.dir, routing, args.gpu_memory_utilization)
    res = dict(engine=engine.name, version=engine.version(), routing=args.routing, start_s=time.perf_counter() - t0,
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               layers=json.load(open(os.path.join(args.dir, "config.json")))["num_hidden_layers"], rows={})
    print(f"{engine.name} routing {args.routing}: started in {res['start_s']:.1f} s", flush=True)

    def record(name: str, seconds: float, tokens: int, compiled: int, **extra) -> None:
        res["rows"][name] = dict(seconds=seconds, out_tok_s=tokens / seconds, triton_compiles=compiled, **extra)
        print(f"  {name}: {tokens / seconds:,.0f} tok/s ({seconds:.1f} s, {compiled} Triton compiles) {extra}",
              flush=True)
        json.dump(res, open(args.json, "w"), indent=1)

    for row in args.rows.split(","):
        if row in ROWS:
            num, n, inp, out = row_shape(row, args.output_scale)
            prompts = prompts_for(num, inp, seed=ord(row))
            passes = 2 if row == "a" else 1
            for i in range(passes):
                engine.profile(0.0)  # drops what the rows before left
                s, _, compiled = timed(engine, prompts, n, out)
                prof = engine.profile(s)
                record(f"{row}{'' if passes == 1 else f'_pass{i + 1}'}", s, num * n * out, compiled,
                       shape=f"{num}x{n} {inp}/{out}", **({"profile": prof} if prof else {}))
            # the return path alone, in one engine (no process-to-process spread): capture stays on, the
            # requests ask for their routing or not, alternately
            paired = routing and engine.name == "routereplay" and row in args.return_rows.split(",")
            pairs = args.return_pairs if paired else 0
            for i, engine.returning in enumerate(abba(pairs)):
                s, _, compiled = timed(engine, prompts, n, out)
                record(f"{row}_return_{'on' if engine.returning else 'off'}{i // 2 + 1}", s, num * n * out, compiled,
                       shape=f"{num}x{n} {inp}/{out}", profile=engine.profile(s))
            engine.returning = routing  # the later rows return routing again
        elif row == "d":
            inp, out = BS1
            p = prompts_for(1, inp, seed=4)
            timed(engine, p, 1, 8)  # warm
            t1, _, _ = timed(engine, p, 1, 1)
            tn, _, compiled = timed(engine, p, 1, 1 + out)
            res["rows"]["d"] = dict(ms_per_token=(tn - t1) / out * 1e3, ttft_ms=t1 * 1e3, triton_compiles=compiled)
            print(f"  d: {res['rows']['d']}", flush=True)
            json.dump(res, open(args.json, "w"), indent=1)
        elif row == "agree":
            num, inp, out = AGREE
            _, outs, _ = timed(engine, prompts_for(num, inp, seed=5), 1, out, temperature=0.0)
            np.savez_compressed(args.json.replace(".json", "_routing.npz"), prompts=num, input_len=inp, **{
                f"tokens{i}": np.asarray(o[0][0]) for i, o in enumerate(outs)}, **{
                f"routing{i}": np.asarray(o[0][1]) for i, o in enumerate(outs) if o[0][1] is not None})
            print("  agree: routing saved", flush=True)
        else:
            raise SystemExit(f"unknown row {row!r}")
    json.dump(res, open(args.json, "w"), indent=1)


def onoff(args) -> None:
    """Routing on / off in ONE process: two engines of this one, capture on (every request's routing returned)
    and capture off, with the same KV pool size, take turns on each row (off, on, on, off, ...; the ABBA order
    cancels a drift). No process-to-process spread (up to 9% at row a: docs/PERFORMANCE.md). Both pools stay
    resident, or with ``--take-turns`` only the running engine's: before every pass both release their KV
    cache (``release_memory``) and the next one resumes it (a fresh pool and prefix cache, graphs captured
    again), so row b fits at full length."""
    import torch

    if args.smoke:
        smoke()
    shapes = {row: row_shape(row, args.output_scale) for row in args.rows.split(",")}
    # every sample's tokens at once (the n samples of a prompt share its prompt blocks), 5% spare, and a
    # partly filled last block per sequence (16 tokens a block: the engine's default block_size)
    tokens = max(num * (inp + n * out) for num, n, inp, out in shapes.values())
    blocks = int(tokens * 1.05) // 16 + MAX_NUM_SEQS
    t0 = time.perf_counter()
    engines = {}
    for routing in (False, True):
        engines[routing] = Ours(args.dir, routing, 0.9, num_kv_blocks=blocks)
        if args.take_turns:
            engines[routing].llm.engine.release_memory(["kv_cache"])

    def take_turn(engine: Ours) -> None:
        if args.take_turns:
            for e in engines.values():
                e.llm.engine.release_memory(["kv_cache"])
            engine.llm.engine.resume_memory(["kv_cache"])

    res = dict(engine="routereplay", gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               torch=torch.__version__, date=time.strftime("%Y-%m-%d"), kv_blocks=blocks,
               take_turns=args.take_turns, start_s=time.perf_counter() - t0, rows={})
    print(f"two engines ({blocks} KV blocks each) started in {res['start_s']:.1f} s", flush=True)
    for row, (num, n, inp, out) in shapes.items():
        prompts = prompts_for(num, inp, seed=ord(row))
        for engine in engines.values():  # warm: every prompt and batch shape once, outside the timing
            take_turn(engine)
            timed(engine, prompts, n, min(out, 512))
        passes = {"on": [], "off": []}
        for routing in abba(args.pairs):
            engine = engines[routing]
            take_turn(engine)
            # the off engine really has no capture: no routing cache, so its graphs hold no routing write
            assert (engine.llm.engine.runner.routing_cache is not None) == routing
            engine.profile(0.0)
            s, _, _ = timed(engine, prompts, n, out)
            prof = engine.profile(s)
            passes["on" if routing else "off"].append(dict(out_tok_s=num * n * out / s, seconds=s, profile=prof))
            print(f"  {row} routing {'on' if routing else 'off'}: {num * n * out / s:,.0f} tok/s "
                  f"(decode {prof['decode_ms_per_step']} ms/step)", flush=True)
        mean = {k: sum(p["out_tok_s"] for p in v) / len(v) for k, v in passes.items()}
        decode = {k: sum(p["profile"]["decode_ms_per_step"] for p in v) / len(v) for k, v in passes.items()}
        res["rows"][row] = dict(shape=f"{num}x{n} {inp}/{out}", passes=passes, on_off=mean["on"] / mean["off"],
                                decode_ms_on_off=decode["on"] / decode["off"])
        print(f"{row}: on / off {mean['on'] / mean['off']:.4f} (mean tok/s of {args.pairs} passes each); decode "
              f"ms per step on / off {decode['on'] / decode['off']:.4f}", flush=True)
        json.dump(res, open(args.json, "w"), indent=1)


def agreement(a_npz: str, b_npz: str) -> tuple[float, int]:
    """Share of (token, layer) whose top-k expert SETS agree, over prompt tokens and the generated tokens
    before the two greedy rollouts first differ (after that they route different text)."""
    a, b = np.load(a_npz), np.load(b_npz)
    same = total = 0
    prompt = int(a["input_len"])
    for i in range(int(a["prompts"])):
        if f"routing{i}" not in a or f"routing{i}" not in b:
            continue
        ta, tb = a[f"tokens{i}"], b[f"tokens{i}"]
        diverge = next((j for j in range(min(len(ta), len(tb))) if ta[j] != tb[j]), min(len(ta), len(tb)))
        rows = prompt + diverge  # row t routes token t; rows past the divergence route different tokens
        ra, rb = np.sort(a[f"routing{i}"][:rows], -1), np.sort(b[f"routing{i}"][:rows], -1)
        same += int((ra == rb).all(-1).sum())
        total += ra.shape[0] * ra.shape[1]
    return same / max(total, 1), total


def table(args) -> None:
    runs = [json.load(open(p)) for p in args.files]
    every: dict[tuple[str, str], list[dict]] = {}  # on / off runs may be repeated (alternating processes)
    for r in runs:
        every.setdefault((r["engine"], r["routing"]), []).append(r)
    by = {k: rs[0] for k, rs in every.items()}  # the first run of each: start-up, batch 1, compiles
    ours, theirs = by.get(("routereplay", "on")), by.get(("vllm", "on"))
    first = next(iter(runs))
    print(f"## {first['gpu']}, torch {first['torch']}, {first['date']}: Qwen3-30B-A3B width, {first['layers']} layers,"
          f" bf16, saved weights; routereplay {ours and ours['version']} vs vLLM {theirs and theirs['version']}\n")
    print("| row | routereplay tok/s | vLLM tok/s | ratio | routereplay on/off | vLLM on/off |")
    print("| --- | --- | --- | --- | --- | --- |")
    def measured(engine: str, routing: str, row: str) -> list[float]:
        """tok/s of the row in each run of (engine, routing) that has it."""
        return [r["rows"][row]["out_tok_s"] for r in every.get((engine, routing), []) if row in r["rows"]]

    def tok(row: str, engine: str, routing: str) -> float | None:
        got = measured(engine, routing, row)
        return max(got) if got else None  # the best run

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:,.0f}"

    def ratio(x: float | None, y: float | None) -> str:
        return "-" if x is None or y is None else f"{x / y:.3f}"

    for k in sorted({k for r in runs for k in r["rows"] if k != "d" and "_return_" not in k}):
        o, v, oo, vo = (tok(k, e, rt) for e, rt in (("routereplay", "on"), ("vllm", "on"), ("routereplay", "off"),
                                                     ("vllm", "off")))
        shape = next(r["rows"][k].get("shape", "") for r in runs if k in r["rows"])
        print(f"| {k} ({shape}) | {num(o)} | {num(v)} | {ratio(o, v)} | {ratio(o, oo)} | {ratio(v, vo)} |")
    for (e, rt), rs in every.items():
        if len(rs) > 1:
            print(f"\n{e} routing {rt}, each run (tok/s): " + "; ".join(
                f"{k} " + " / ".join(f"{r['rows'][k]['out_tok_s']:,.0f}" for r in rs if k in r["rows"])
                for k in sorted({k for r in rs for k in r["rows"] if k != "d" and "_return_" not in k})), end="")

    def mean(engine: str, routing: str, row: str) -> float | None:
        got = measured(engine, routing, row)
        return sum(got) / len(got) if got else None
    for r in every.get(("routereplay", "on"), []):
        for row in sorted({k.split("_return_")[0] for k in r["rows"] if "_return_" in k}):
            got = {w: [v["out_tok_s"] for k, v in r["rows"].items() if k.startswith(f"{row}_return_{w}")]
                   for w in ("on", "off")}
            print(f"\nroutereplay, one engine, row {row} with routing returned / not returned: "
                  f"{ratio(sum(got['on']) / len(got['on']), sum(got['off']) / len(got['off']))} (means of "
                  f"{len(got['on'])} alternating passes each; on {[round(x) for x in got['on']]}, "
                  f"off {[round(x) for x in got['off']]})", end="")
    for e in ("routereplay", "vllm"):
        pairs = {k: ratio(mean(e, "on", k), mean(e, "off", k)) for k in ("a_pass1", "a_pass2", "b")}
        if any(v != "-" for v in pairs.values()):
            print(f"\n{e} on / off from the mean of each side's runs: {pairs}", end="")
    profiled = {f"{e}/{rt}": {k: v["profile"] for k, v in r["rows"].items() if "profile" in v} for (e, rt), r in
                by.items()}
    print(f"\n\nprofile (routereplay: engine steps, mean ms per step, host seconds in the routing return): {profiled}")
    for engine_routing, r in by.items():
        if "d" in r["rows"]:
            print(f"\nbatch 1, {engine_routing}: {r['rows']['d']['ms_per_token']:.2f} ms per token "
                  f"(TTFT {r['rows']['d']['ttft_ms']:.0f} ms)", end="")
    print("\n\nstart-up: " + ", ".join(f"{e} routing {rt} {r['start_s']:.1f} s" for (e, rt), r in by.items()))
    compiles = {f"{e}/{rt}": {k: v.get("triton_compiles") for k, v in r["rows"].items()} for (e, rt), r in by.items()}
    print(f"Triton compiles during each row: {compiles}")
    pa = [p.replace(".json", "_routing.npz") for p in args.files]
    npz = {(r["engine"], r["routing"]): p for r, p in zip(runs, pa, strict=True) if os.path.exists(p)}
    if ("routereplay", "on") in npz and ("vllm", "on") in npz:
        share, n = agreement(npz[("routereplay", "on")], npz[("vllm", "on")])
        print(f"greedy routing agreement (top-k sets equal): {share:.4f} of {n} (token, layer) pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--dir", required=True)
    w.add_argument("--layers", type=int, default=8)
    r = sub.add_parser("run")
    r.add_argument("--engine", choices=("routereplay", "vllm"), required=True)
    r.add_argument("--dir", required=True)
    r.add_argument("--routing", choices=("on", "off"), default="on")
    r.add_argument("--rows", default="a,d,agree,c,b")
    r.add_argument("--output-scale", type=float, default=1.0, help="row b's output length times this")
    r.add_argument("--return-pairs", type=int, default=0,
                   help="this engine, routing on: N more passes of each --return-rows row without and with "
                        "routing returned (off, on, on, off, ...)")
    r.add_argument("--return-rows", default="a", help="rows that get --return-pairs (comma-separated)")
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    r.add_argument("--json", required=True)
    r.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on CPU")
    o = sub.add_parser("onoff", help="routing on / off in one process (two engines taking turns)")
    o.add_argument("--dir", required=True)
    o.add_argument("--rows", default="a,b")
    o.add_argument("--pairs", type=int, default=4, help="passes of each row per engine (order off, on, on, off, ...)")
    o.add_argument("--output-scale", type=float, default=0.5, help="row b's output length times this (1.0 needs "
                   "--take-turns on one H200)")
    o.add_argument("--take-turns", action="store_true", help="only the running engine's KV pool is resident")
    o.add_argument("--json", required=True)
    o.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on CPU")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    args = ap.parse_args()
    {"write": write, "run": run, "onoff": onoff, "table": table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
