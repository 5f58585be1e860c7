"""`routereplay inspect STORE [KEY] [--plot PNG]`: what a routing store holds.

Prints the number of keys, routing rows (tokens) and bytes, and per MoE layer how evenly the
stored tokens spread over the experts (normalised entropy, max/mean and min/mean load, unused
experts). ``--plot`` writes a heatmap of the expert load (MoE layers x experts).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from routereplay import store as routing_store

EXPERT_ID_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


@dataclass
class StoreSummary:
    """Totals over the selected keys; ``load[l, e]`` counts the (token, slot) pairs routed to expert e."""

    keys: list[str]
    tokens: int
    nbytes: int
    dtype: np.dtype
    num_layers: int
    top_k: int
    num_experts: int
    load: np.ndarray  # [L, E] int64

    @property
    def load_share(self) -> np.ndarray:
        """Fraction of each layer's (token, slot) pairs that went to each expert; rows sum to 1."""
        totals = self.load.sum(axis=1, keepdims=True)
        return self.load / np.maximum(totals, 1)

    def layer_stats(self) -> list[dict[str, float]]:
        """Per MoE layer: normalised entropy (1 = uniform), max/mean and min/mean load, unused experts."""
        if self.num_experts == 1:
            return [dict(entropy=1.0, max_over_mean=1.0, min_over_mean=1.0, unused=0)] * self.num_layers
        stats = []
        for share in self.load_share:
            nonzero = share[share > 0]
            entropy = float(-(nonzero * np.log(nonzero)).sum() / np.log(self.num_experts))
            mean = share.mean()
            stats.append(dict(entropy=entropy, max_over_mean=float(share.max() / mean) if mean else 0.0,
                              min_over_mean=float(share.min() / mean) if mean else 0.0,
                              unused=int((share == 0).sum())))
        return stats


def select_keys(store: routing_store.RoutingStore, key: str | None) -> list[str]:
    """``key`` exactly if stored, else every key starting with it (all keys when None)."""
    if key is not None and key in store:
        return [key]
    return store.keys(key or "")


def summarize(store: routing_store.RoutingStore, keys: list[str], num_experts: int | None = None) -> StoreSummary:
    """Read ``keys`` and total their routing; all must share one [rows, L, K] layout and expert-id dtype."""
    if not keys:
        raise ValueError("no routing keys selected")
    tokens = nbytes = 0
    layout: tuple[int, int] | None = None
    dtype: np.dtype | None = None
    arrays = []
    for key in keys:
        array = store.get(key)
        if array.ndim != 3:
            raise ValueError(f"key {key!r}: routing must be [rows, L, K], got shape {array.shape}")
        if layout is None:
            layout, dtype = array.shape[1:], array.dtype
        if array.shape[1:] != layout or array.dtype != dtype:
            raise ValueError(f"key {key!r}: {array.dtype} {array.shape} does not match the first key's "
                             f"{dtype} [rows, {layout[0]}, {layout[1]}]; inspect one model's keys at a time")
        tokens += array.shape[0]
        nbytes += array.nbytes
        arrays.append(np.asarray(array))
    assert layout is not None and dtype is not None
    if dtype not in EXPERT_ID_DTYPES:
        raise ValueError(f"routing dtype {dtype} is not an expert-id dtype (uint8/uint16); "
                         "a debug-mode store holds token positions, not experts")
    layers, top_k = layout
    ids = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros((0, layers, top_k), np.int64)
    largest = int(ids.max()) + 1 if ids.size else top_k
    experts = largest if num_experts is None else num_experts
    if experts < largest:
        raise ValueError(f"--num-experts {experts} but the store holds expert id {largest - 1}")
    flat = (ids + np.arange(layers)[None, :, None] * experts).ravel()  # one bincount for all layers
    load = np.bincount(flat, minlength=layers * experts).reshape(layers, experts)
    return StoreSummary(keys, tokens, nbytes, dtype, layers, top_k, experts, load)


def report(summary: StoreSummary, url: str, experts_given: bool, print_fn: Callable[[str], None] = print) -> None:
    shown = ", ".join(summary.keys[:3]) + (", ..." if len(summary.keys) > 3 else "")
    print_fn(f"store: {url}")
    print_fn(f"keys: {len(summary.keys)} ({shown})")
    print_fn(f"tokens: {summary.tokens} (routing rows)")
    print_fn(f"bytes: {summary.nbytes} ({summary.dtype}, [rows, {summary.num_layers} MoE layers, top-{summary.top_k}])")
    origin = "" if experts_given else " (largest stored id + 1; pass --num-experts to set it)"
    print_fn(f"experts: {summary.num_experts}{origin}")
    print_fn("per-MoE-layer expert load (entropy 1.00 = perfectly even):")
    print_fn(f"{'layer':>5}{'entropy':>9}{'max/mean':>10}{'min/mean':>10}{'unused':>8}")
    for layer, s in enumerate(summary.layer_stats()):
        print_fn(f"{layer:>5}{s['entropy']:>9.3f}{s['max_over_mean']:>10.2f}{s['min_over_mean']:>10.2f}"
                 f"{s['unused']:>8}")


def plot_load(summary: StoreSummary, path: str, title: str) -> str:
    """Heatmap of expert load relative to an even spread (1.0), MoE layers x experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = summary.load_share * summary.num_experts
    fig, ax = plt.subplots(figsize=(min(4 + 0.25 * summary.num_experts, 24), 1.8 + 0.45 * summary.num_layers))
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert id", ylabel="MoE layer",
           title=f"{title}\nexpert load / even load ({summary.tokens} tokens, {len(summary.keys)} keys)")
    ax.set_yticks(range(summary.num_layers))
    fig.colorbar(image, ax=ax, label="load / even load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routereplay inspect", description="Summarise the routing in a store.")
    parser.add_argument("store", help="store URL: a directory, file:///dir or redis://host:port/db?prefix=...")
    parser.add_argument("key", nargs="?", help="one key, or a key prefix (default: every key)")
    parser.add_argument("--num-experts", type=int, help="experts per MoE layer (default: largest stored id + 1)")
    parser.add_argument("--plot", metavar="PNG", help="write a heatmap of the expert load per layer")
    args = parser.parse_args(argv)
    if args.num_experts is not None and args.num_experts < 1:
        parser.error("--num-experts must be >= 1")
    from redis.exceptions import RedisError

    try:
        with routing_store.open(args.store, create=False) as store:  # inspecting a typo must not create it
            keys = select_keys(store, args.key)
            if not keys:
                where = f"matching {args.key!r} " if args.key else ""
                print(f"error: no routing keys {where}in {args.store}", file=sys.stderr)
                return 1
            summary = summarize(store, keys, args.num_experts)
    except (ValueError, KeyError, OSError, RedisError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report(summary, args.store, args.num_experts is not None)
    if args.plot:
        print(f"heatmap: {plot_load(summary, args.plot, args.store + (f' [{args.key}]' if args.key else ''))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
