"""`routereplay demo`: the whole R3 loop on a small random MoE, on CPU, with no downloads.

The engine samples rollouts in bf16 and records every token's experts into a local routing store;
a transformers copy of the same checkpoint trains on them in fp32 with a few GRPO-style
policy-gradient steps and syncs its weights back into the engine after each step. The loop runs
twice from the same initial weights and seeds: once with the trainer's native routing, once
replaying the rollout routing from the store (R3). Each step reports the training/inference
mismatch (k3 KL, F(2), max |dp|) and the router disagreement between the rollout and the routing
the training forward used, plus the disagreement a native forward would have had.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from routereplay import store as routing_store
from routereplay.engine.llm import LLM
from routereplay.metrics import policy_mismatch, router_disagreement
from routereplay.replay import RoutingReplay, align
from routereplay.sampling_params import SamplingParams
from routereplay.tiny import make_tiny_checkpoint

# A little bigger than the tiny test model: every layer is MoE, and a wider init makes the policy
# peaked enough that the bf16-vs-fp32 mismatch (and routing flips) visibly move the log-probs.
DEMO_MODEL: dict = dict(
    hidden_size=128, intermediate_size=192, num_hidden_layers=6, num_experts=32, num_experts_per_tok=4,
    moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True, initializer_range=0.1,
)
FIRST_PRINTABLE, NUM_PRINTABLE = 3, 100  # the tiny tokenizer: ids 3.. are string.printable
DIGIT_IDS = frozenset(range(3, 13))  # string.printable starts with '0'..'9'
RUNS = ("native", "replay")


@dataclass
class DemoSettings:
    """Knobs of one demo; the defaults take a couple of minutes on 2 CPU cores."""

    workdir: str = "demo_out"
    steps: int = 12
    prompts: int = 8
    samples: int = 8  # n samples per prompt: one GRPO group
    prompt_len: int = 16
    max_tokens: int = 32
    lr: float = 1e-3
    clip: float = 0.2  # PPO clip on the importance ratio vs the rollout log-probs
    seed: int = 0
    plots: bool = True


@dataclass
class StepMetrics:
    """One training step of one run. Disagreements are over every token that has a rollout row."""

    run: str
    step: int
    reward: float
    k3_kl: float  # training forward (native or replayed routing) vs rollout log-probs
    extreme_fraction: float  # F(2)
    max_abs_dp: float
    mean_abs_dp: float
    disagreement: float  # rollout routing vs the routing the training forward used
    native_disagreement: float  # rollout routing vs the trainer router's own (native) choice
    native_k3_kl: float  # k3 KL of a native forward on the same rollouts
    used_per_layer: list[float] = field(default_factory=list)
    native_per_layer: list[float] = field(default_factory=list)
    routed_tokens: int = 0  # tokens compared (each has a rollout row)
    response_tokens: int = 0
    seconds: float = 0.0


@dataclass
class DemoResult:
    history: dict[str, list[StepMetrics]]
    plots: list[str]
    model_dir: str
    store_dir: str


def reward(token_ids: Sequence[int]) -> float:
    """The task: fraction of generated characters that are digits (about 8% for a random policy)."""
    return sum(t in DIGIT_IDS for t in token_ids) / max(len(token_ids), 1)


def prepare_checkpoint(path: str) -> str:
    """Create the demo checkpoint at ``path``, or reuse one already there with the same config."""
    if os.path.exists(os.path.join(path, "config.json")):
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(path)  # attribute names, whatever config.json calls them
        if saved.model_type == "qwen3_moe" and all(getattr(saved, k, None) == v for k, v in DEMO_MODEL.items()):
            return path
        shutil.rmtree(path)
    return make_tiny_checkpoint(path, "qwen3_moe", **DEMO_MODEL)


def make_prompts(seed: int, count: int, length: int) -> list[list[int]]:
    """Random printable-character prompts, the same for both runs at a given step."""
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_PRINTABLE, FIRST_PRINTABLE + NUM_PRINTABLE, size=(count, length)).tolist()


@contextmanager
def tap_routers(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the expert ids every router hands to its experts, in call order ([B*T, K] each).

    A forward hook sees the router's output after any replay patch, so this is the routing the
    forward actually used, checked independently of RoutingReplay's own bookkeeping.
    """
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    used: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: used.append(out[2].detach())) for r in routers]
    try:
        yield used
    finally:
        for hook in hooks:
            hook.remove()


def stack_routing(per_layer: list[torch.Tensor], batch: int, seq: int) -> torch.Tensor:
    """Per-router ids of one forward, ``[B*T, K]`` each, as ``[B, T, L, K]``."""
    return torch.stack([ids.reshape(batch, seq, -1) for ids in per_layer], dim=2)


@dataclass
class Batch:
    """Right-padded training batch; position t predicts token t + 1 of its sequence."""

    input_ids: torch.Tensor  # [B, T]: each sequence without its last token
    attention_mask: torch.Tensor
    targets: torch.Tensor  # [B, T]: the next token
    response_mask: torch.Tensor  # [B, T]: True where the target is a generated token
    rollout_logprobs: torch.Tensor  # [B, T]: the engine's log-prob of that target
    advantages: torch.Tensor  # [B]
    lengths: list[int]  # input length of each sequence (= its routing rows)


def build_batch(
    sequences: list[list[int]], prompt_lens: list[int], logprobs: list[list[float]], advantages: list[float]
) -> Batch:
    lengths = [len(s) - 1 for s in sequences]
    shape = (len(sequences), max(lengths))
    input_ids = torch.zeros(shape, dtype=torch.long)
    targets = torch.zeros(shape, dtype=torch.long)
    response = torch.zeros(shape, dtype=torch.bool)
    rollout_lp = torch.zeros(shape)
    for i, (seq, p, lps) in enumerate(zip(sequences, prompt_lens, logprobs, strict=True)):
        n = len(seq) - 1
        input_ids[i, :n] = torch.tensor(seq[:-1])
        targets[i, :n] = torch.tensor(seq[1:])
        response[i, p - 1 : n] = True
        rollout_lp[i, p - 1 : n] = torch.tensor(lps, dtype=torch.float32)
    attention_mask = (torch.arange(shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    return Batch(input_ids, attention_mask, targets, response, rollout_lp, torch.tensor(advantages), lengths)


def token_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Log-prob of each target under the model at temperature 1 (what the engine sampled from)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[..., None])[..., 0]


def grpo_loss(logprobs: torch.Tensor, batch: Batch, clip: float) -> torch.Tensor:
    """PPO-clipped policy gradient with the importance ratio against the rollout log-probs, token mean."""
    ratio = torch.exp(logprobs - batch.rollout_logprobs)
    adv = batch.advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    mask = batch.response_mask.float()
    return -(surrogate * mask).sum() / mask.sum()


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """GRPO: each sample's reward normalised within its prompt's group; ``rewards`` is [prompts, n]."""
    return (rewards - rewards.mean(axis=1, keepdims=True)) / (rewards.std(axis=1, keepdims=True) + 1e-6)


def run_loop(
    settings: DemoSettings, model_dir: str, store_dir: str, run: str, log: Callable[[StepMetrics], None]
) -> list[StepMetrics]:
    """One run of the loop (``run`` = "native" or "replay") from the checkpoint's initial weights."""
    from transformers import AutoModelForCausalLM

    replay = run == "replay"
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    rr = RoutingReplay(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    llm = LLM(model_dir, dtype="bfloat16", seed=settings.seed, max_model_len=settings.prompt_len + settings.max_tokens,
              num_kv_blocks=max(64, 4 * settings.prompts * settings.samples),
              routing_replay={"enable": True, "store": "local", "local_store_dir": store_dir})
    store = routing_store.open(store_dir)
    history = []
    try:
        for step in range(settings.steps):
            start = time.perf_counter()
            prompts = make_prompts(settings.seed * 100_003 + step, settings.prompts, settings.prompt_len)
            params = [SamplingParams(n=settings.samples, temperature=1.0, max_tokens=settings.max_tokens,
                                     seed=settings.seed * 100_003 + step * 1_000 + i, logprobs=True,
                                     rollout_id=f"{run}/step{step}/prompt{i}") for i in range(len(prompts))]
            outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            samples = [(out.prompt_token_ids, c) for out in outputs for c in out.outputs]
            rewards = np.array([[reward(c.token_ids) for c in out.outputs] for out in outputs])
            batch = build_batch([p + c.token_ids for p, c in samples], [len(p) for p, _ in samples],
                                [c.logprobs for _, c in samples], group_advantages(rewards).reshape(-1).tolist())
            # The trainer's view: routing comes from the store by rollout key, not from the outputs.
            rollout_routing, mask = align(store.get_many([c.routing_key for _, c in samples]), batch.lengths,
                                          num_layers=len(rr.moe_layer_ids), top_k=rr.top_k,
                                          num_experts=rr.num_experts)
            bsz, seq = batch.input_ids.shape
            if replay:
                with torch.no_grad(), rr.record() as rec:  # what the trainer's routers would have picked
                    native_logprobs = token_logprobs(model, batch)
                native_routing = rec.routing
                with tap_routers(model) as used, rr.replay(rollout_routing, mask):
                    logprobs = token_logprobs(model, batch)
                    loss = grpo_loss(logprobs, batch, settings.clip)
                    loss.backward()
            else:
                with tap_routers(model) as used, rr.record() as rec:
                    logprobs = token_logprobs(model, batch)
                native_routing, native_logprobs = rec.routing, logprobs.detach()
                grpo_loss(logprobs, batch, settings.clip).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            llm.update_weights(model.named_parameters())

            used_routing = stack_routing(used, bsz, seq)
            mismatch = policy_mismatch(logprobs.detach(), batch.rollout_logprobs, batch.response_mask)
            native_mismatch = policy_mismatch(native_logprobs, batch.rollout_logprobs, batch.response_mask)
            used_dis = router_disagreement(rollout_routing.long(), used_routing, mask)
            native_dis = router_disagreement(rollout_routing.long(), native_routing, mask)
            metrics = StepMetrics(
                run=run, step=step, reward=float(rewards.mean()), k3_kl=mismatch.k3_kl,
                extreme_fraction=mismatch.extreme_fraction, max_abs_dp=mismatch.max_abs_prob_diff,
                mean_abs_dp=mismatch.mean_abs_prob_diff, disagreement=used_dis.pair_rate,
                native_disagreement=native_dis.pair_rate, native_k3_kl=native_mismatch.k3_kl,
                used_per_layer=list(used_dis.per_layer), native_per_layer=list(native_dis.per_layer),
                routed_tokens=used_dis.num_tokens, response_tokens=mismatch.num_tokens,
                seconds=time.perf_counter() - start,
            )
            history.append(metrics)
            log(metrics)
    finally:
        llm.close()
        store.close()
    return history


HEADER = (
    f"{'run':<7}{'step':>5}{'reward':>8}{'k3 KL':>11}{'F(2)':>8}{'max|dp|':>9}"
    f"{'dis(used)':>11}{'dis(native)':>13}{'KL(native fwd)':>16}{'s':>6}"
)
LEGEND = (
    "k3 KL, F(2), max|dp|: training forward vs rollout log-probs of the generated tokens; dis(used): router "
    "disagreement,\nrollout vs the routing the training forward used; dis(native) / KL(native fwd): what a native "
    "forward\n(the trainer's own routers) would give on the same rollouts; s: seconds per step"
)


def format_row(m: StepMetrics) -> str:
    return (
        f"{m.run:<7}{m.step:>5}{m.reward:>8.3f}{m.k3_kl:>11.2e}{m.extreme_fraction:>8.4f}{m.max_abs_dp:>9.4f}"
        f"{m.disagreement:>11.2%}{m.native_disagreement:>13.2%}{m.native_k3_kl:>16.2e}{m.seconds:>6.1f}"
    )


def plot_curves(history: dict[str, list[StepMetrics]], path: str) -> str:
    """Per-step curves of both runs: reward, mismatch metrics and router disagreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"native": "tab:red", "replay": "tab:blue"}
    panels = [
        ("reward", "Reward (fraction of digits)", "mean reward", False),
        ("k3_kl", "Training/inference k3 KL", "k3 KL (log scale)", True),
        ("extreme_fraction", "F(2): tokens with ratio > 2", "fraction of tokens", False),
        ("max_abs_dp", "max |p_train - p_rollout|", "max |dp|", False),
        ("mean_abs_dp", "mean |p_train - p_rollout|", "mean |dp|", False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (attr, title, ylabel, log_scale) in zip(axes.flat, panels, strict=False):
        for run, steps in history.items():
            ax.plot([m.step for m in steps], [getattr(m, attr) for m in steps], "o-", color=colors.get(run),
                    label=f"{run} routing")
        if attr == "k3_kl" and "replay" in history:
            steps = history["replay"]
            ax.plot([m.step for m in steps], [m.native_k3_kl for m in steps], "x:", color=colors["replay"],
                    label="replay run, native forward (same rollouts)")
        if log_scale:
            ax.set_yscale("log")
        if attr == "extreme_fraction" and not any(m.extreme_fraction for steps in history.values() for m in steps):
            ax.set_ylim(-0.01, 0.1)
            ax.text(0.5, 0.5, "no token had p_train / p_rollout\noutside [1/2, 2] in either run",
                    transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes.flat[5]
    for run, steps in history.items():
        x = [m.step for m in steps]
        ax.plot(x, [100 * m.native_disagreement for m in steps], "o-", color=colors.get(run),
                label=f"{run} run: rollout vs native pick")
        ax.plot(x, [100 * m.disagreement for m in steps], "s--", color=colors.get(run), mfc="none",
                label=f"{run} run: rollout vs routing used")
    ax.set(title="Router disagreement, rollout (bf16) vs training (fp32)", xlabel="training step",
           ylabel="(token, layer) pairs that differ (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle("routereplay demo: GRPO on a random Qwen3-MoE, native routing vs rollout routing replay (R3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_layer(history: dict[str, list[StepMetrics]], path: str) -> str:
    """Per-MoE-layer disagreement with the rollout routing, averaged over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for run, steps in history.items():
        bars.append((f"{run} run: native pick", np.mean([m.native_per_layer for m in steps], axis=0)))
        if run == "replay":
            bars.append(("replay run: routing used", np.mean([m.used_per_layer for m in steps], axis=0)))
    layers = np.arange(len(bars[0][1]))
    width = 0.8 / len(bars)
    colors = ["tab:red", "tab:orange", "tab:blue"]
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (label, values) in enumerate(bars):
        x = layers + (i - (len(bars) - 1) / 2) * width
        ax.bar(x, 100 * values, width, label=label, color=colors[i % len(colors)])
        for xi, value in zip(x, values, strict=True):
            if value == 0:  # an invisible bar: say it is exactly zero
                ax.annotate("0", (xi, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                            color=colors[i % len(colors)], fontweight="bold")
    ax.set_xticks(layers, [f"MoE layer {i}" for i in layers])
    ax.set(ylabel="(token, layer) pairs that differ from the rollout (%)",
           title="Router disagreement per MoE layer (mean over steps); replayed routing is exactly 0")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(settings: DemoSettings, print_fn: Callable[[str], None] = print) -> DemoResult:
    """Prepare the checkpoint, run the loop natively and with replay, print the table, write the plots."""
    os.makedirs(settings.workdir, exist_ok=True)
    model_dir = prepare_checkpoint(os.path.join(settings.workdir, "model"))
    store_dir = os.path.join(settings.workdir, "routing")
    with routing_store.open(store_dir) as store:
        store.clear()  # keys of an earlier demo with other settings would linger
    print_fn(f"model: {model_dir} (random qwen3_moe, {DEMO_MODEL['num_hidden_layers']} MoE layers, "
             f"{DEMO_MODEL['num_experts']} experts, top-{DEMO_MODEL['num_experts_per_tok']}); "
             f"rollouts bf16, training fp32; routing store: {store_dir}")
    print_fn(f"{settings.steps} steps x {settings.prompts} prompts x {settings.samples} samples x "
             f"{settings.max_tokens} tokens; reward = fraction of generated digits")
    print_fn(LEGEND)
    print_fn(HEADER)
    history = {run: run_loop(settings, model_dir, store_dir, run, lambda m: print_fn(format_row(m))) for run in RUNS}
    native, replay = history["native"], history["replay"]
    print_fn("")
    print_fn(f"mean k3 KL: native {np.mean([m.k3_kl for m in native]):.2e}, "
             f"replay {np.mean([m.k3_kl for m in replay]):.2e} "
             f"(a native forward on the replay run's rollouts: {np.mean([m.native_k3_kl for m in replay]):.2e})")
    print_fn(f"router disagreement, rollout vs training: native {np.mean([m.disagreement for m in native]):.2%}, "
             f"replay {max(m.disagreement for m in replay):.2%} (the trainer's own pick would differ in "
             f"{np.mean([m.native_disagreement for m in replay]):.2%})")
    with open(os.path.join(settings.workdir, "history.json"), "w") as f:
        json.dump({run: [asdict(m) for m in steps] for run, steps in history.items()}, f, indent=1)
    plots = []
    if settings.plots:
        plots = [plot_curves(history, os.path.join(settings.workdir, "curves.png")),
                 plot_per_layer(history, os.path.join(settings.workdir, "per_layer_disagreement.png"))]
        print_fn("plots: " + ", ".join(plots))
    print_fn(f"inspect the stored routing: routereplay inspect {store_dir} --plot {settings.workdir}/expert_load.png")
    return DemoResult(history, plots, model_dir, store_dir)


def main(argv: list[str] | None = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="routereplay demo",
        description="Rollouts with routing capture -> store -> GRPO training with and without routing replay (R3), "
                    "on a small random MoE on CPU. Prints per-step mismatch metrics and writes plots.",
    )
    parser.add_argument("--workdir", default=defaults.workdir, help="checkpoint, routing store, plots (%(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per run (%(default)s)")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="prompts per step (%(default)s)")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="samples per prompt (%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="tokens per sample (%(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (%(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="skip writing the PNG plots")
    args = parser.parse_args(argv)
    for name in ("steps", "prompts", "samples", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.samples < 2:
        parser.error("--samples must be >= 2 (advantages are normalised within each prompt's samples)")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    run_demo(DemoSettings(workdir=args.workdir, steps=args.steps, prompts=args.prompts, samples=args.samples,
                          max_tokens=args.max_tokens, lr=args.lr, seed=args.seed, plots=not args.no_plots))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
