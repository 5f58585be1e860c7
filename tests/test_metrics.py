"""Training/inference mismatch metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from routereplay.metrics import policy_mismatch, rollout_router_disagreement, router_disagreement
from routereplay.outputs import CompletionOutput, RequestOutput


def test_policy_mismatch_matches_hand_computation() -> None:
    p_rollout = np.array([0.5, 0.2, 0.9, 0.1])
    p_train = np.array([0.5, 0.5, 0.3, 0.1])  # r = 1, 2.5, 1/3, 1
    stats = policy_mismatch(np.log(p_train), np.log(p_rollout))
    ratios = p_train / p_rollout
    assert stats.k3_kl == pytest.approx(np.mean(ratios - 1 - np.log(ratios)))
    assert stats.extreme_fraction == 0.5  # 2.5 and 3 exceed tau = 2
    assert stats.mean_abs_prob_diff == pytest.approx((0.3 + 0.6) / 4)
    assert stats.max_abs_prob_diff == pytest.approx(0.6)
    assert (stats.num_tokens, stats.tau) == (4, 2.0)
    assert policy_mismatch(np.log(p_train), np.log(p_rollout), tau=3.5).extreme_fraction == 0.0


def test_identical_policies_have_zero_mismatch() -> None:
    logprobs = torch.log(torch.tensor([[0.3, 0.6], [0.9, 0.05]]))
    stats = policy_mismatch(logprobs, logprobs.clone())
    assert (stats.k3_kl, stats.extreme_fraction, stats.max_abs_prob_diff) == (0.0, 0.0, 0.0)


def test_mask_selects_response_tokens_and_torch_bf16_is_accepted() -> None:
    train = torch.log(torch.tensor([[0.5, 0.1], [0.4, 0.2]], dtype=torch.bfloat16))
    rollout = torch.log(torch.tensor([[0.5, 0.9], [0.4, 0.2]], dtype=torch.bfloat16))
    mask = torch.tensor([[True, False], [True, True]])
    stats = policy_mismatch(train, rollout, mask=mask)
    assert stats.num_tokens == 3 and stats.k3_kl == 0.0 and stats.max_abs_prob_diff == 0.0
    assert policy_mismatch(train, rollout).extreme_fraction == 0.25


def test_k3_is_positive_and_tiny_for_tiny_mismatch() -> None:
    stats = policy_mismatch(np.array([-1.0 + 1e-4]), np.array([-1.0]))
    assert stats.k3_kl == pytest.approx(0.5e-8, rel=1e-3)


def test_policy_mismatch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        policy_mismatch(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="selects no tokens"):
        policy_mismatch(np.zeros(3), np.zeros(3), mask=np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="tau"):
        policy_mismatch(np.zeros(3), np.zeros(3), tau=1.0)


def test_router_disagreement_compares_sets_not_order() -> None:
    # 3 tokens, 2 layers, K=2.
    a = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 2], [1, 3]]], dtype=np.uint8)
    b = np.array([[[1, 0], [3, 2]], [[4, 6], [6, 7]], [[0, 2], [1, 4]]], dtype=np.uint8)
    result = router_disagreement(a, b)
    assert result.pair_rate == pytest.approx(2 / 6)
    assert result.per_layer == pytest.approx((1 / 3, 1 / 3))
    assert result.token_rate == pytest.approx(2 / 3)
    assert result.num_tokens == 3


def test_router_disagreement_on_masked_torch_batches() -> None:
    a = torch.zeros(2, 3, 4, 2, dtype=torch.long)
    a[..., 1] = 1
    b = a.clone()
    b[1, 2, 3] = torch.tensor([1, 5])  # masked out below
    b[0, 1, 0] = torch.tensor([1, 7])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    result = router_disagreement(a, b, mask)
    assert result.num_tokens == 5
    assert result.pair_rate == pytest.approx(1 / 20)
    assert result.per_layer == pytest.approx((1 / 5, 0.0, 0.0, 0.0))
    assert result.token_rate == pytest.approx(1 / 5)
    assert math.isclose(router_disagreement(a, b).token_rate, 2 / 6)


def test_router_disagreement_rejects_bad_input() -> None:
    a = np.zeros((3, 2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        router_disagreement(a, np.zeros((4, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="integer dtype"):
        router_disagreement(a, a.astype(np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        router_disagreement(a, a, mask=np.ones(2, dtype=bool))


def _output(prompt: list[int], tokens: list[int], routing: np.ndarray, start: int = 0) -> RequestOutput:
    done = CompletionOutput(0, tokens, None, "length", routed_experts=routing, routed_experts_start=start)
    return RequestOutput("r", None, prompt, [done], [0, 1])


def test_rollout_router_disagreement_counts_only_rows_of_identical_tokens() -> None:
    rng = np.random.default_rng(0)
    prompt, tokens = [5, 6, 7, 8], [1, 2, 3, 4]
    routing = np.stack([rng.permutation(8)[:2] for _ in range(14)]).reshape(7, 2, 2)  # 4 + 4 - 1 rows
    other = routing.copy()
    other[5, 1] = [7, 6] if set(routing[5, 1]) != {6, 7} else [0, 1]  # row of position 5 (token 2 forwarded)
    other[6] = 0  # after the sequences diverge: not compared
    a = _output(prompt, tokens, routing)
    b = _output(prompt, [1, 2, 9, 4], other)
    dis = rollout_router_disagreement([a], [b])
    assert dis.num_tokens == 6  # positions 0..5: the prompt and the two shared generated tokens
    assert dis.pair_rate == pytest.approx(1 / 12) and dis.per_layer == (0.0, pytest.approx(1 / 6))
    started = rollout_router_disagreement([_output(prompt, tokens, routing[2:], 2)],
                                          [_output(prompt, [1, 2, 9, 4], other[2:], 2)])
    assert started.num_tokens == 4 and started.pair_rate == pytest.approx(1 / 8)


def test_rollout_router_disagreement_rejects_mismatched_outputs() -> None:
    r = np.zeros((3, 2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="different prompts"):
        rollout_router_disagreement([_output([1, 2], [3, 4], r)], [_output([1, 3], [3, 4], r)])
    with pytest.raises(ValueError, match="routed_experts is missing"):
        rollout_router_disagreement([_output([1, 2], [3, 4], r)], [_output([1, 2], [3, 4], None)])
    with pytest.raises(ValueError, match="2 requests"):
        rollout_router_disagreement([_output([1, 2], [3, 4], r)] * 2, [])
