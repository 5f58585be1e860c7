"""Wire codec for routing arrays, plus readers for the formats SGLang and vLLM return (and SGLang's writer).

Wire form (in API responses): ``{"dtype": "uint8", "shape": [T, L, K], "data": base64(.npy bytes)}``.
The ``.npy`` payload is self-describing, so any numpy can read it; ``dtype``/``shape`` are repeated
in clear for clients that only want to inspect them, and :func:`decode` checks that both agree.

SGLang's form (:func:`to_sglang` / :func:`from_sglang`) is different: headerless int32 with a slot for
every decoder layer, dense layers zero-filled, so reading it needs the model's layer layout.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["decode", "encode", "from_sglang", "from_vllm", "routing_dtype", "to_sglang"]

_MAX_EXPERTS = int(np.iinfo(np.uint16).max) + 1


def routing_dtype(num_experts: int) -> np.dtype:
    """The one rule for routing ids: uint8 when ``num_experts`` <= 256, else uint16."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if not 1 <= num_experts <= _MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {_MAX_EXPERTS}], got {num_experts}")
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.uint16)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _b64decode(data: Any, field: str) -> bytes:
    if not isinstance(data, (str, bytes, bytearray)):
        raise ValueError(f"{field!r} must be a base64 str, got {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{field!r} is not valid base64: {exc}") from None


def _load_npy(raw: bytes, field: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/EOFError/... for malformed payloads
        raise ValueError(f"{field!r} does not hold valid .npy bytes: {exc}") from None


def encode(array: np.ndarray) -> dict[str, Any]:
    """JSON-ready wire form of a routing array (little-endian ``.npy``, base64)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"routing arrays hold integer ids, got dtype {arr.dtype}")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return {
        "dtype": arr.dtype.name,
        "shape": [int(n) for n in arr.shape],
        "data": base64.b64encode(_npy_bytes(arr)).decode("ascii"),
    }


def decode(obj: Mapping[str, Any]) -> np.ndarray:
    """Array from :func:`encode`'s dict; ValueError naming the field that is missing or disagrees."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"routed_experts must be a dict, got {type(obj).__name__}")
    for field in ("dtype", "shape", "data"):
        if field not in obj:
            raise ValueError(f"routed_experts is missing the {field!r} field")
    arr = _load_npy(_b64decode(obj["data"], "data"), "data")
    try:
        dtype = np.dtype(obj["dtype"])
    except TypeError:
        raise ValueError(f"'dtype' is not a numpy dtype name: {obj['dtype']!r}") from None
    if dtype != arr.dtype:
        raise ValueError(f"'dtype' says {obj['dtype']!r} but the data holds {arr.dtype.name}")
    shape = obj["shape"]
    try:
        claimed = [int(n) for n in shape] if isinstance(shape, (list, tuple)) else None
    except (TypeError, ValueError):
        claimed = None
    if claimed != list(arr.shape):
        raise ValueError(f"'shape' says {shape!r} but the data holds {list(arr.shape)}")
    return arr


def _compact(ids: np.ndarray) -> np.ndarray:
    """Smallest unsigned dtype the ids fit; int32 kept when any id is negative (e.g. -1 padding)."""
    if ids.size == 0:
        return ids.astype(np.uint8)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi > np.iinfo(np.uint16).max:
        return ids.astype(np.int32)
    return ids.astype(np.uint8 if hi <= np.iinfo(np.uint8).max else np.uint16)


class _Required:
    """Default of :func:`from_sglang`'s required layout arguments: an old 3-argument call gets a clear TypeError."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_layer_ids(moe_layer_ids: Any, num_hidden_layers: int) -> list[int]:
    """``moe_layer_ids`` as a list of ints, strictly increasing, each in ``[0, num_hidden_layers)``."""
    if isinstance(moe_layer_ids, (int, np.integer)) and not isinstance(moe_layer_ids, bool):
        raise TypeError(
            f"moe_layer_ids must be the model layer index of each MoE layer (a sequence of ints), got the int "
            f"{moe_layer_ids}. SGLang's routed_experts has a slot for every decoder layer (dense ones zero), so "
            "pass moe_layer_ids (RequestOutput.moe_layer_ids / ModelConfig.moe_layer_ids) and num_hidden_layers: "
            "from_sglang(b64, moe_layer_ids, num_hidden_layers, top_k). The old from_sglang(b64, num_moe_layers, "
            "top_k) misread every model with dense layers"
        )
    if isinstance(moe_layer_ids, (str, bytes, bytearray)) or not hasattr(moe_layer_ids, "__iter__"):
        raise TypeError(f"moe_layer_ids must be a sequence of ints, got {type(moe_layer_ids).__name__}")
    ids = list(moe_layer_ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"moe_layer_ids must hold ints, got {i!r} ({type(i).__name__})")
    ids = [int(i) for i in ids]
    if any(b <= a for a, b in zip(ids[:-1], ids[1:], strict=True)):
        raise ValueError(f"moe_layer_ids must be strictly increasing, got {ids}")
    bad = [i for i in ids if not 0 <= i < num_hidden_layers]
    if bad:
        raise ValueError(f"moe_layer_ids {bad} outside [0, num_hidden_layers={num_hidden_layers}); got {ids}")
    return ids


def to_sglang(compact: np.ndarray, moe_layer_ids: Sequence[int], num_hidden_layers: int) -> str:
    """Our compact routing as SGLang's ``meta_info["routed_experts"]``: base64 of little-endian int32 ``[T, N, K]``.

    ``compact`` is ``[T, len(moe_layer_ids), K]`` (what the engine returns; any unsigned/integer dtype);
    ``moe_layer_ids[j]`` is the model layer index of column ``j``; ``N = num_hidden_layers`` counts every
    decoder layer, dense ones included. Column ``j`` goes to slot ``moe_layer_ids[j]``; every other slot
    (a dense layer) is zero, as SGLang leaves it (its capture buffer, in ``python/sglang/srt/layers/moe/
    routed_experts_capturer.py``, is ``torch.zeros((num_tokens, hf_text_config.num_hidden_layers,
    num_experts_per_tok), dtype=torch.int32)`` and only MoE layers write their slot). C order, no header:
    slime (``slime/utils/misc.py`` ``decode_int32_meta_array`` then ``slime/utils/types.py``
    ``Sample._apply_meta_info``) reads it with ``torch.frombuffer(..., dtype=torch.int32)``, checks the
    element count against ``(len(tokens) - 1 - routed_experts_start_len) * num_layers * moe_router_topk``
    and reshapes to ``[rows, num_layers, topk]``, indexing by absolute layer id.

    ValueError (naming the argument) for a shape that disagrees with ``moe_layer_ids``, layer ids not
    strictly increasing or outside ``[0, num_hidden_layers)``, or ids that are negative / not int32.
    """
    num_hidden_layers = _check_count(num_hidden_layers, "num_hidden_layers", 1)
    ids = _check_layer_ids(moe_layer_ids, num_hidden_layers)
    arr = np.asarray(compact)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"compact must hold integer expert ids, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] < 1:
        raise ValueError(f"compact must be [T, num_moe_layers, top_k] with top_k >= 1, got shape {list(arr.shape)}")
    if arr.shape[1] != len(ids):
        raise ValueError(
            f"compact has {arr.shape[1]} MoE layer columns but moe_layer_ids has {len(ids)} entries ({ids})"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int32).max):
        raise ValueError(f"compact holds ids in [{int(arr.min())}, {int(arr.max())}], outside int32's [0, 2**31)")
    full = np.zeros((arr.shape[0], num_hidden_layers, arr.shape[2]), dtype="<i4")
    full[:, ids, :] = arr
    return base64.b64encode(full.tobytes(order="C")).decode("ascii")


def from_sglang(
    b64: str | bytes,
    moe_layer_ids: Sequence[int],
    num_hidden_layers: int = _REQUIRED,
    top_k: int = _REQUIRED,
    num_rows: int | None = None,
    *,
    num_experts: int | None = None,
) -> np.ndarray:
    """Read SGLang's ``meta_info["routed_experts"]`` into our compact ``[T, len(moe_layer_ids), top_k]``.

    The payload (see :func:`to_sglang`; written by SGLang's ``python/sglang/srt/layers/moe/
    routed_experts_capturer.py``, read by slime's ``slime/utils/misc.py`` ``decode_int32_meta_array`` and
    ``slime/utils/types.py`` ``Sample._apply_meta_info``) is base64 of little-endian int32
    ``[T, num_hidden_layers, top_k]``, one slot per decoder layer with zeros at dense layers, and carries no
    shape: the caller gives the layer ids (``RequestOutput.moe_layer_ids`` / ``ModelConfig.moe_layer_ids``),
    the config's ``num_hidden_layers`` (all layers, dense included, no MTP layers) and ``top_k``.
    ``num_rows``, when given, is the row count the caller expects (``prompt_len + output_len - 1 -
    routed_experts_start_len``), checked like slime checks it.

    dtype: with ``num_experts``, exactly the engine's (:func:`routing_dtype`: uint8 when num_experts <= 256,
    else uint16) and every id must be < num_experts. Without it, the smallest of uint8 / uint16 that holds
    this payload's largest id (as before), which for a model with more than 256 experts can be uint8 when
    no id above 255 happens to be used: pass ``num_experts`` for a dtype that depends on the model only.

    ValueError when the byte length is not a multiple of ``4 * num_hidden_layers * top_k``, when ``num_rows``
    disagrees, when a dense layer's slot is non-zero (the layer ids or num_hidden_layers are wrong for this
    payload: reading on would misplace layers), when a layer listed as MoE holds only zeros in every row and
    slot while ``top_k >= 2`` (a top-k router's k ids per token are distinct, so that layer is dense), when an
    id is negative or beyond uint16 / num_experts, or when the layer ids are not strictly increasing in
    ``[0, num_hidden_layers)``. TypeError for the old
    ``from_sglang(b64, num_moe_layers, top_k)`` call: it cannot tell a dense layer's zero slot from a row, so
    it misread every model with dense layers.
    """
    ids_given_as_int = isinstance(moe_layer_ids, (int, np.integer)) and not isinstance(moe_layer_ids, bool)
    if ids_given_as_int or num_hidden_layers is _REQUIRED or top_k is _REQUIRED:
        if ids_given_as_int:  # the old from_sglang(b64, num_moe_layers, top_k[, ...]): it cannot be read safely
            _check_layer_ids(moe_layer_ids, 1)  # raises the TypeError that explains the new signature
        missing = [n for n, v in (("num_hidden_layers", num_hidden_layers), ("top_k", top_k)) if v is _REQUIRED]
        raise TypeError(f"from_sglang() missing required argument(s) {missing}: call "
                        "from_sglang(b64, moe_layer_ids, num_hidden_layers, top_k, num_rows=None)")
    num_hidden_layers = _check_count(num_hidden_layers, "num_hidden_layers", 1)
    top_k = _check_count(top_k, "top_k", 1)
    ids = _check_layer_ids(moe_layer_ids, num_hidden_layers)
    if num_rows is not None:
        num_rows = _check_count(num_rows, "num_rows", 0)
    dtype = None if num_experts is None else routing_dtype(num_experts)

    raw = _b64decode(b64, "routed_experts")
    row = 4 * num_hidden_layers * top_k
    if len(raw) % row:
        raise ValueError(
            f"SGLang routed_experts holds {len(raw)} bytes, not a multiple of "
            f"4 * num_hidden_layers({num_hidden_layers}) * top_k({top_k}) = {row} (one int32 per layer, "
            "dense layers included, per expert slot)"
        )
    full = np.frombuffer(raw, dtype="<i4").reshape(-1, num_hidden_layers, top_k)
    if num_rows is not None and full.shape[0] != num_rows:
        raise ValueError(
            f"SGLang routed_experts holds {full.shape[0]} rows of [{num_hidden_layers}, {top_k}], expected "
            f"num_rows={num_rows} (prompt_len + output_len - 1 - routed_experts_start_len)"
        )
    dense = np.ones(num_hidden_layers, dtype=bool)
    dense[ids] = False
    if dense.any():
        hot = np.flatnonzero(full[:, dense, :].any(axis=(0, 2)))
        if hot.size:
            layers = np.flatnonzero(dense)[hot].tolist()
            raise ValueError(
                f"SGLang routed_experts has non-zero ids at layer(s) {layers}, which moe_layer_ids={ids} calls "
                f"dense (SGLang zero-fills dense layers): moe_layer_ids / num_hidden_layers={num_hidden_layers} "
                "do not match the model that produced this payload"
            )
    out = full[:, ids, :]
    if top_k >= 2 and out.shape[0]:
        # a top-k router picks k distinct experts per token, so at most one slot of a row can be 0: a layer
        # whose every slot is 0 is one SGLang never wrote, i.e. a dense layer listed as MoE
        empty = np.flatnonzero(~out.any(axis=(0, 2)))
        if empty.size:
            layers = [ids[j] for j in empty.tolist()]
            raise ValueError(
                f"moe_layer_ids={ids} lists layer(s) {layers} as MoE but SGLang routed_experts has only zeros "
                f"there (top_k={top_k} distinct experts per token cannot all be 0): those are dense layers, "
                "moe_layer_ids does not match the model that produced this payload"
            )
    if out.size:
        lo, hi = int(out.min()), int(out.max())
        if lo < 0:
            raise ValueError(f"SGLang routed_experts has a negative expert id ({lo}); expert ids are >= 0")
        limit = _MAX_EXPERTS if num_experts is None else num_experts
        if hi >= limit:
            what = "uint16" if num_experts is None else f"num_experts={num_experts}"
            raise ValueError(f"SGLang routed_experts has expert id {hi}, beyond {what} (ids must be < {limit})")
    if dtype is None:
        dtype = np.dtype(np.uint8 if not out.size or int(out.max()) <= np.iinfo(np.uint8).max else np.uint16)
    return np.ascontiguousarray(out, dtype=dtype)


def from_vllm(obj: str | bytes | Mapping[str, Any]) -> np.ndarray:
    """Read vLLM's ``routed_experts``: base64 ``.npy`` bytes, as a str or a dict with ``"data"``.

    A dict that also carries ``dtype``/``shape`` is checked like :func:`decode`. Returns the
    compact dtype when the ids fit, else int32.
    """
    if isinstance(obj, Mapping):
        if "data" not in obj:
            raise ValueError("vLLM routed_experts dict is missing the 'data' field")
        if "dtype" in obj and "shape" in obj:
            arr = decode(obj)
        else:
            arr = _load_npy(_b64decode(obj["data"], "data"), "data")
    else:
        arr = _load_npy(_b64decode(obj, "routed_experts"), "routed_experts")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"vLLM routed_experts must hold integer ids, got dtype {arr.dtype}")
    return _compact(arr)
