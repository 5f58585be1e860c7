"""Place per-sample routing arrays into the layout of a training batch.

A rollout's routing is stored per sample as ``[n_tokens - 1, L_moe, K]`` (row t = the experts
used when token t was forwarded). A training batch is padded (right or left) or packed, so the
rows must be moved to the positions their tokens occupy there; every position without a row
(a sample's last token, padding) is masked out and routes natively during replay.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

RoutingLike = np.ndarray | torch.Tensor

_WIDENED_NUMPY_DTYPES = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}


class AlignedRouting(NamedTuple):
    """Routing laid out like a batch: ``routing [B, T, L, K]`` and ``mask [B, T]`` (True = replay)."""

    routing: torch.Tensor
    mask: torch.Tensor


def as_integer_tensor(routing: RoutingLike, where: str) -> torch.Tensor:
    """Convert a routing array to a torch tensor, refusing float and bool dtypes.

    Unsigned dtypes wider than uint8 are widened to a signed dtype, because torch supports few
    operations on them. ``where`` names the offending input in the error message.
    """
    if isinstance(routing, np.ndarray):
        if not np.issubdtype(routing.dtype, np.integer):
            raise ValueError(f"{where}: routing dtype {routing.dtype} is not an integer dtype")
        if routing.dtype == np.uint64:
            raise ValueError(f"{where}: routing dtype uint64 is not supported; use uint8, uint16 or int64")
        widened = _WIDENED_NUMPY_DTYPES.get(routing.dtype)
        if widened is not None:
            routing = routing.astype(widened)
        return torch.from_numpy(np.ascontiguousarray(routing))
    if isinstance(routing, torch.Tensor):
        if routing.dtype == torch.bool or routing.is_floating_point() or routing.is_complex():
            raise ValueError(f"{where}: routing dtype {routing.dtype} is not an integer dtype")
        if routing.dtype in (torch.uint16, torch.uint32):
            return routing.to(torch.int64)
        if routing.dtype == torch.uint64:
            raise ValueError(f"{where}: routing dtype torch.uint64 is not supported; use uint8 or int64")
        return routing
    raise TypeError(f"{where}: expected a numpy array or torch tensor, got {type(routing).__name__}")


def find_invalid_row(
    routing: torch.Tensor, mask: torch.Tensor | None, num_experts: int | None
) -> tuple[int, int, int, str] | None:
    """Return ``(b, t, layer, reason)`` of the first bad row of ``routing [B, T, L, K]``, else None.

    A row is bad when an id is negative, not below ``num_experts`` (when given) or repeated within
    the row. Rows where ``mask [B, T]`` is False are not checked: they are never replayed. Costs one
    device synchronisation when nothing is wrong.
    """
    ids = routing.to(torch.int64)
    out_of_range = ids < 0
    if num_experts is not None:
        out_of_range = out_of_range | (ids >= num_experts)
    sorted_ids = ids.sort(dim=-1).values
    duplicate = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1)
    bad = out_of_range.any(dim=-1) | duplicate
    if mask is not None:
        bad = bad & mask.to(device=bad.device, dtype=torch.bool)[..., None]
    if not bool(bad.any()):
        return None
    b, t, layer = (int(i) for i in bad.nonzero()[0])
    row = ids[b, t, layer].tolist()
    if bool(out_of_range[b, t, layer].any()):
        bound = f"[0, {num_experts})" if num_experts is not None else "non-negative"
        return b, t, layer, f"expert ids {row} outside {bound}"
    return b, t, layer, f"duplicate expert ids {row}"


def _check_samples(
    samples: Sequence[RoutingLike],
    num_tokens: Sequence[int],
    num_layers: int | None,
    top_k: int | None,
) -> tuple[list[torch.Tensor], int, int]:
    """Convert samples, check their shapes against each other (or the given L, K) and their lengths."""
    if len(samples) != len(num_tokens):
        raise ValueError(f"{len(samples)} routing samples but {len(num_tokens)} token counts")
    if not samples:
        raise ValueError("no samples to align")
    tensors = []
    for i, (sample, n) in enumerate(zip(samples, num_tokens, strict=True)):
        tensor = as_integer_tensor(sample, f"sample {i}")
        if tensor.dim() != 3:
            raise ValueError(
                f"sample {i}: routing must be [n_tokens - 1, L, K], got shape {tuple(tensor.shape)}"
            )
        if n < 1:
            raise ValueError(f"sample {i}: token count must be >= 1, got {n}")
        rows, layers, k = tensor.shape
        if num_layers is None:
            num_layers = layers
        if layers != num_layers:
            raise ValueError(f"sample {i}: routing has {layers} MoE layers, expected {num_layers}")
        if top_k is None:
            top_k = k
        if k != top_k:
            raise ValueError(f"sample {i}: routing has K={k} experts per row, expected {top_k}")
        if rows < n - 1:
            raise ValueError(
                f"sample {i}, position {rows}, all layers: routing is shorter than the batch needs "
                f"({rows} rows for {n} tokens; expected {n - 1})"
            )
        tensors.append(tensor.cpu())
    assert num_layers is not None and top_k is not None
    return tensors, num_layers, top_k


def _output_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """uint8 when every input is uint8 (E <= 256), else int32 (holds any uint16 id)."""
    return torch.uint8 if all(t.dtype == torch.uint8 for t in tensors) else torch.int32


def _raise_invalid(
    routing: torch.Tensor,
    mask: torch.Tensor,
    num_experts: int | None,
    locate: Callable[[int, int], tuple[int, int]],
) -> None:
    """Validate the assembled batch; ``locate(b, t)`` maps a batch slot back to (sample, position)."""
    invalid = find_invalid_row(routing, mask, num_experts)
    if invalid is None:
        return
    b, t, layer, reason = invalid
    sample, position = locate(b, t)
    raise ValueError(f"sample {sample}, position {position}, MoE layer {layer}: {reason}")


def align(
    samples: Sequence[RoutingLike],
    num_tokens: Sequence[int],
    padding_side: Literal["right", "left"] = "right",
    total_length: int | None = None,
    *,
    num_layers: int | None = None,
    top_k: int | None = None,
    num_experts: int | None = None,
) -> AlignedRouting:
    """Lay per-sample routing ``[n_i - 1, L, K]`` out as a padded batch ``[B, T, L, K]`` + mask ``[B, T]``.

    ``num_tokens[i]`` is sample i's token count in the batch; T is ``total_length`` or the longest
    sample. A sample may carry more rows than ``n_i - 1`` (its sequence was truncated for training):
    then its last kept token is replayed too. ``num_layers``/``top_k``/``num_experts`` (e.g. from
    ``RoutingReplay``) are checked when given. The routing dtype is uint8 when all samples are uint8,
    else int32. Raises ValueError naming the sample, position and layer of bad input.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    tensors, layers, k = _check_samples(samples, num_tokens, num_layers, top_k)
    longest = max(num_tokens)
    length = longest if total_length is None else total_length
    if length < longest:
        raise ValueError(f"total_length {length} is shorter than the longest sample ({longest} tokens)")
    routing = torch.zeros(len(tensors), length, layers, k, dtype=_output_dtype(tensors))
    mask = torch.zeros(len(tensors), length, dtype=torch.bool)
    starts = [0 if padding_side == "right" else length - n for n in num_tokens]
    for i, (tensor, n, start) in enumerate(zip(tensors, num_tokens, starts, strict=True)):
        kept = min(n, tensor.shape[0])
        routing[i, start : start + kept] = tensor[:kept].to(routing.dtype)
        mask[i, start : start + kept] = True
    _raise_invalid(routing, mask, num_experts, lambda b, t: (b, t - starts[b]))
    return AlignedRouting(routing, mask)


def align_packed(
    samples: Sequence[RoutingLike],
    num_tokens: Sequence[int],
    total_length: int | None = None,
    *,
    num_layers: int | None = None,
    top_k: int | None = None,
    num_experts: int | None = None,
) -> AlignedRouting:
    """Lay per-sample routing out as one packed row ``[1, S, L, K]`` + mask ``[1, S]``.

    Samples follow each other in order, sample i occupying ``num_tokens[i]`` positions; S is
    ``total_length`` (trailing padding) or ``sum(num_tokens)``. Same checks and dtype as ``align``.
    """
    tensors, layers, k = _check_samples(samples, num_tokens, num_layers, top_k)
    used = sum(num_tokens)
    length = used if total_length is None else total_length
    if length < used:
        raise ValueError(f"total_length {length} is shorter than the packed samples ({used} tokens)")
    routing = torch.zeros(1, length, layers, k, dtype=_output_dtype(tensors))
    mask = torch.zeros(1, length, dtype=torch.bool)
    starts = np.cumsum([0, *num_tokens[:-1]]).tolist()
    for tensor, n, start in zip(tensors, num_tokens, starts, strict=True):
        kept = min(n, tensor.shape[0])
        routing[0, start : start + kept] = tensor[:kept].to(routing.dtype)
        mask[0, start : start + kept] = True

    def locate(_: int, t: int) -> tuple[int, int]:
        sample = bisect.bisect_right(starts, t) - 1
        return sample, t - starts[sample]

    _raise_invalid(routing, mask, num_experts, locate)
    return AlignedRouting(routing, mask)
