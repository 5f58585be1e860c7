"""Training/inference mismatch metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from routereplay.metrics import policy_mismatch, router_disagreement


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
