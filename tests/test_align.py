"""Placing per-sample routing [n_i - 1, L, K] into padded and packed training batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routereplay.replay import align, align_packed

L, K, E = 3, 2, 8


def sample(rows: int, first: int) -> np.ndarray:
    """Distinct valid ids per row; row t starts with expert (first + t) % E, so rows are recognisable."""
    starts = (first + np.arange(rows)) % E
    ids = np.stack([starts, (starts + 1) % E], axis=-1)  # [rows, K]
    return np.repeat(ids[:, None, :], L, axis=1).astype(np.uint8)


def test_right_padding_places_rows_at_the_start_and_masks_the_rest() -> None:
    a, b = sample(4, 0), sample(2, 5)
    routing, mask = align([a, b], [5, 3])
    assert routing.shape == (2, 5, L, K) and routing.dtype == torch.uint8
    assert mask.tolist() == [[True] * 4 + [False], [True, True, False, False, False]]
    assert torch.equal(routing[0, :4], torch.from_numpy(a))
    assert torch.equal(routing[1, :2], torch.from_numpy(b))


def test_left_padding_places_rows_at_the_end_before_the_last_token() -> None:
    a, b = sample(4, 0), sample(2, 5)
    routing, mask = align([a, b], [5, 3], padding_side="left", total_length=6)
    assert routing.shape == (2, 6, L, K)
    assert mask.tolist() == [[False, True, True, True, True, False], [False] * 3 + [True, True, False]]
    assert torch.equal(routing[0, 1:5], torch.from_numpy(a))
    assert torch.equal(routing[1, 3:5], torch.from_numpy(b))


def test_packed_layout_concatenates_samples() -> None:
    a, b, c = sample(2, 0), sample(3, 3), sample(0, 0)
    routing, mask = align_packed([a, b, c], [3, 4, 1], total_length=10)
    assert routing.shape == (1, 10, L, K)
    assert mask[0].tolist() == [True, True, False, True, True, True, False, False, False, False]
    assert torch.equal(routing[0, 0:2], torch.from_numpy(a))
    assert torch.equal(routing[0, 3:6], torch.from_numpy(b))


def test_truncated_sample_replays_every_kept_token() -> None:
    routing, mask = align([sample(6, 0)], [4])
    assert mask.tolist() == [[True] * 4]
    assert torch.equal(routing[0], torch.from_numpy(sample(6, 0)[:4]))


def test_wide_and_torch_inputs_become_int32() -> None:
    wide = sample(2, 0).astype(np.uint16) + 200
    routing, _ = align([wide, torch.from_numpy(sample(2, 0).astype(np.int64))], [3, 3], num_experts=256)
    assert routing.dtype == torch.int32
    assert routing[0, 0, 0].tolist() == [200, 201]


def test_wrong_number_of_layers_names_the_sample() -> None:
    with pytest.raises(ValueError, match="sample 1: routing has 2 MoE layers, expected 3"):
        align([sample(2, 0), sample(2, 0)[:, :2]], [3, 3])
    with pytest.raises(ValueError, match="sample 0: routing has 3 MoE layers, expected 4"):
        align([sample(2, 0)], [3], num_layers=4)


def test_wrong_k_names_the_sample() -> None:
    with pytest.raises(ValueError, match="sample 0: routing has K=2 experts per row, expected 4"):
        align([sample(2, 0)], [3], top_k=4)


def test_id_out_of_range_names_sample_position_and_layer() -> None:
    bad = sample(4, 0)
    bad[2, 1, 0] = 8
    with pytest.raises(
        ValueError, match=r"sample 1, position 2, MoE layer 1: expert ids \[8, 3\] outside \[0, 8\)"
    ):
        align([sample(4, 0), bad], [5, 5], padding_side="left", total_length=7, num_experts=E)
    negative = sample(3, 0).astype(np.int64)
    negative[1, 2, 1] = -1
    with pytest.raises(ValueError, match="sample 1, position 1, MoE layer 2: .*non-negative"):
        align_packed([sample(2, 0), negative], [3, 4])


def test_duplicate_ids_name_sample_position_and_layer() -> None:
    bad = sample(3, 0)
    bad[2, 0] = [5, 5]
    with pytest.raises(ValueError, match=r"sample 1, position 2, MoE layer 0: duplicate expert ids \[5, 5\]"):
        align_packed([sample(2, 0), bad], [3, 4])


def test_routing_shorter_than_the_batch_needs() -> None:
    with pytest.raises(ValueError, match="sample 1, position 2, all layers: routing is shorter"):
        align([sample(4, 0), sample(2, 0)], [5, 5])


@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_non_integer_dtype_is_refused(dtype: type) -> None:
    with pytest.raises(ValueError, match="sample 1: routing dtype .* is not an integer dtype"):
        align([sample(2, 0), sample(2, 0).astype(dtype)], [3, 3])
    with pytest.raises(ValueError, match="sample 0: routing dtype .* is not an integer dtype"):
        align_packed([torch.from_numpy(sample(2, 0).astype(dtype))], [3])


def test_bad_layout_arguments() -> None:
    with pytest.raises(ValueError, match="total_length 3 is shorter"):
        align([sample(4, 0)], [5], total_length=3)
    with pytest.raises(ValueError, match="padding_side"):
        align([sample(4, 0)], [5], padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 routing samples but 1 token counts"):
        align([sample(1, 0), sample(1, 0)], [2])
