"""Wire codec for routing arrays, plus readers for the formats SGLang and vLLM return.

Wire form (in API responses): ``{"dtype": "uint8", "shape": [T, L, K], "data": base64(.npy bytes)}``.
The ``.npy`` payload is self-describing, so any numpy can read it; ``dtype``/``shape`` are repeated
in clear for clients that only want to inspect them, and :func:`decode` checks that both agree.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["decode", "encode", "from_sglang", "from_vllm", "routing_dtype"]

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


def from_sglang(b64: str | bytes, num_moe_layers: int, top_k: int) -> np.ndarray:
    """Read SGLang's ``meta_info["routed_experts"]``: base64 of flat little-endian int32 ids.

    SGLang sends no shape, so the caller gives the layer count and top-k the engine used; the
    result is ``[T, num_moe_layers, top_k]`` in the compact dtype when ids fit, else int32.
    """
    if num_moe_layers < 1 or top_k < 1:
        raise ValueError(f"num_moe_layers and top_k must be >= 1, got {num_moe_layers}, {top_k}")
    raw = _b64decode(b64, "routed_experts")
    row = 4 * num_moe_layers * top_k
    if len(raw) % row:
        raise ValueError(
            f"SGLang routed_experts holds {len(raw)} bytes, not a multiple of "
            f"4 * num_moe_layers({num_moe_layers}) * top_k({top_k}) = {row}"
        )
    ids = np.frombuffer(raw, dtype="<i4").reshape(-1, num_moe_layers, top_k)
    return _compact(ids)


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
