"""Training/inference mismatch metrics: how far the trained policy is from the one that sampled.

``policy_mismatch`` compares per-token log-probs of the sampled tokens under the training engine
and under the rollout engine (r = p_train / p_rollout). ``router_disagreement`` compares two
routings of the same tokens (e.g. rollout vs. a native training forward) as sets of experts;
``rollout_router_disagreement`` does so for two generations of the same prompts (e.g. TP=1 vs
TP=2). They accept numpy arrays or torch tensors and return plain Python numbers, ready for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class PolicyMismatch:
    """Per-token mismatch statistics over the selected (response) tokens.

    ``k3_kl`` = mean(r - 1 - log r), an unbiased, non-negative estimate of KL(rollout || train) from
    rollout samples; ``extreme_fraction`` = F(tau), the fraction of tokens with max(r, 1/r) > tau;
    ``mean_abs_prob_diff`` / ``max_abs_prob_diff`` = mean / max of |p_train - p_rollout|.
    """

    k3_kl: float
    extreme_fraction: float
    tau: float
    mean_abs_prob_diff: float
    max_abs_prob_diff: float
    num_tokens: int


@dataclass(frozen=True)
class RouterDisagreement:
    """How often two routings of the same tokens chose different expert sets (order ignored).

    ``pair_rate``: fraction of (token, layer) pairs whose top-k sets differ; ``per_layer[l]``: that
    fraction for MoE layer l; ``token_rate``: fraction of tokens that differ in at least one layer.
    """

    pair_rate: float
    per_layer: tuple[float, ...]
    token_rate: float
    num_tokens: int


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    return np.asarray(values)


def _selected(mask: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean selection of shape ``shape`` (everything when ``mask`` is None); refuses an empty selection."""
    if mask is None:
        selected = np.ones(shape, dtype=bool)
    else:
        selected = _to_numpy(mask)
        if selected.shape != shape:
            raise ValueError(f"mask shape {selected.shape} does not match {shape}")
        selected = selected.astype(bool)
    if not selected.any():
        raise ValueError("the mask selects no tokens")
    return selected


def policy_mismatch(
    train_logprobs: ArrayLike,
    rollout_logprobs: ArrayLike,
    mask: ArrayLike | None = None,
    tau: float = 2.0,
) -> PolicyMismatch:
    """Mismatch between training and rollout log-probs of the same sampled tokens.

    ``mask`` (same shape, True = response token) selects the tokens that count. Computed in float64
    so that tiny mismatches are not lost to rounding.
    """
    if tau <= 1.0:
        raise ValueError(f"tau must be > 1, got {tau}")
    train = _to_numpy(train_logprobs).astype(np.float64)
    rollout = _to_numpy(rollout_logprobs).astype(np.float64)
    if train.shape != rollout.shape:
        raise ValueError(f"train_logprobs shape {train.shape} != rollout_logprobs shape {rollout.shape}")
    selected = _selected(mask, train.shape)
    train, rollout = train[selected], rollout[selected]
    log_ratio = train - rollout
    abs_prob_diff = np.abs(np.exp(train) - np.exp(rollout))
    return PolicyMismatch(
        k3_kl=float(np.mean(np.expm1(log_ratio) - log_ratio)),
        extreme_fraction=float(np.mean(np.abs(log_ratio) > math.log(tau))),
        tau=float(tau),
        mean_abs_prob_diff=float(abs_prob_diff.mean()),
        max_abs_prob_diff=float(abs_prob_diff.max()),
        num_tokens=int(train.size),
    )


def router_disagreement(
    routing_a: ArrayLike, routing_b: ArrayLike, mask: ArrayLike | None = None
) -> RouterDisagreement:
    """Compare two routings ``[..., L, K]`` of the same tokens as sets of experts per (token, layer).

    ``mask`` has the leading (token) shape, e.g. ``[T]`` or ``[B, T]``; True = count this token.
    """
    a, b = _to_numpy(routing_a), _to_numpy(routing_b)
    for name, routing in (("routing_a", a), ("routing_b", b)):
        if not np.issubdtype(routing.dtype, np.integer):
            raise ValueError(f"{name}: routing dtype {routing.dtype} is not an integer dtype")
        if routing.ndim < 3:
            raise ValueError(f"{name}: routing must be [..., L, K], got shape {routing.shape}")
    if a.shape != b.shape:
        raise ValueError(f"routing_a shape {a.shape} != routing_b shape {b.shape}")
    selected = _selected(mask, a.shape[:-2])
    differs = np.any(np.sort(a[selected], axis=-1) != np.sort(b[selected], axis=-1), axis=-1)  # [tokens, L]
    return RouterDisagreement(
        pair_rate=float(differs.mean()),
        per_layer=tuple(float(rate) for rate in differs.mean(axis=0)),
        token_rate=float(differs.any(axis=-1).mean()),
        num_tokens=int(differs.shape[0]),
    )


def rollout_router_disagreement(outputs_a: list, outputs_b: list) -> RouterDisagreement:
    """Router disagreement between two generations of the same prompts (``RequestOutput`` lists,
    e.g. two tensor-parallel sizes or two engines), over the rows both computed from the same
    tokens: the prompt and the generated tokens before the first one that differs.
    """
    if len(outputs_a) != len(outputs_b):
        raise ValueError(f"outputs_a has {len(outputs_a)} requests, outputs_b {len(outputs_b)}")
    rows_a, rows_b = [], []
    for i, (a, b) in enumerate(zip(outputs_a, outputs_b, strict=True)):
        if a.prompt_token_ids != b.prompt_token_ids:
            raise ValueError(f"request {i}: the two outputs have different prompts")
        ca, cb = a.outputs[0], b.outputs[0]
        if ca.routed_experts is None or cb.routed_experts is None:
            raise ValueError(f"request {i}: routed_experts is missing (generate with routing capture on)")
        if ca.routed_experts_start != cb.routed_experts_start:
            raise ValueError(f"request {i}: routed_experts_start differs ({ca.routed_experts_start} vs "
                             f"{cb.routed_experts_start})")
        pairs = zip(ca.token_ids, cb.token_ids, strict=False)
        same = next((j for j, (x, y) in enumerate(pairs) if x != y), min(len(ca.token_ids), len(cb.token_ids)))
        n = len(a.prompt_token_ids) + same - ca.routed_experts_start  # row j is position start + j
        n = min(n, len(ca.routed_experts), len(cb.routed_experts))
        rows_a.append(np.asarray(ca.routed_experts[:n]))
        rows_b.append(np.asarray(cb.routed_experts[:n]))
    return router_disagreement(np.concatenate(rows_a), np.concatenate(rows_b))
