"""Wire codec and readers for SGLang / vLLM routing payloads."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from routereplay.routing.codec import decode, encode, from_sglang, from_vllm, routing_dtype, to_sglang


def ids(t: int, layers: int, k: int, high: int, dtype: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(t, layers, k)).astype(dtype)


@pytest.mark.parametrize("dtype,high", [("uint8", 256), ("uint16", 65536)])
@pytest.mark.parametrize("shape", [(0, 2, 2), (1, 1, 1), (33, 5, 8)])
def test_encode_decode_round_trip(dtype: str, high: int, shape: tuple[int, int, int]) -> None:
    arr = ids(*shape, high=high, dtype=dtype)
    obj = json.loads(json.dumps(encode(arr)))  # must survive JSON
    assert obj["dtype"] == dtype and obj["shape"] == list(shape)
    out = decode(obj)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    # the payload is plain .npy: any numpy reads it
    np.testing.assert_array_equal(np.load(io.BytesIO(base64.b64decode(obj["data"]))), arr)


def test_encode_normalises_big_endian() -> None:
    arr = np.arange(24, dtype=">u2").reshape(2, 3, 4)
    out = decode(encode(arr))
    assert out.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(out, arr)


def test_encode_rejects_non_integer() -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode(np.zeros((1, 1, 1), np.float32))


@pytest.mark.parametrize(
    "field,value",
    [("dtype", "uint16"), ("dtype", "not-a-dtype"), ("shape", [4, 2, 2]), ("shape", [3, 2]),
     ("shape", "3,2,2"), ("data", "***not base64***")],
)
def test_decode_rejects_mismatch(field: str, value: object) -> None:
    obj = encode(ids(3, 2, 2, high=8, dtype="uint8"))
    obj[field] = value
    with pytest.raises(ValueError, match=field):
        decode(obj)


@pytest.mark.parametrize("field", ["dtype", "shape", "data"])
def test_decode_rejects_missing_field(field: str) -> None:
    obj = encode(ids(3, 2, 2, high=8, dtype="uint8"))
    del obj[field]
    with pytest.raises(ValueError, match=field):
        decode(obj)


def test_decode_refuses_pickled_payload() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    obj = {"dtype": "object", "shape": [1], "data": base64.b64encode(buf.getvalue()).decode()}
    with pytest.raises(ValueError, match="data"):
        decode(obj)


def test_routing_dtype_rule() -> None:
    assert routing_dtype(1) == np.uint8 and routing_dtype(128) == np.uint8 and routing_dtype(256) == np.uint8
    assert routing_dtype(257) == np.uint16 and routing_dtype(65536) == np.uint16
    for bad in (0, -1, 65537):
        with pytest.raises(ValueError):
            routing_dtype(bad)
    with pytest.raises(TypeError):
        routing_dtype(8.0)  # type: ignore[arg-type]


# SGLang (--enable-return-routed-experts) returns meta_info["routed_experts"] as the base64 of the
# raw bytes of an int32 tensor [T, num_hidden_layers, K] (tensor.numpy().tobytes(), little-endian on
# x86/ARM), a slot for EVERY decoder layer, dense layers zero, with no shape attached. We build exactly
# that from numpy. (The real checkpoints' round trip is in tests/test_sglang_layout.py.)
def sglang_payload(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<i4").tobytes()).decode("ascii")


def sglang_full(compact: np.ndarray, layer_ids: list[int], num_layers: int) -> np.ndarray:
    full = np.zeros((compact.shape[0], num_layers, compact.shape[2]), np.int64)
    full[:, layer_ids, :] = compact
    return full


@pytest.mark.parametrize(
    "high,expected",
    [(64, np.uint8), (256, np.uint8), (300, np.uint16), (65536, np.uint16)],
)
def test_from_sglang(high: int, expected: type) -> None:
    arr = ids(7, 4, 8, high=high, dtype="int64", seed=high)
    arr[0, 0, 0] = high - 1  # make the max id present so the dtype choice is exercised
    out = from_sglang(sglang_payload(arr), [0, 1, 2, 3], 4, 8)
    assert out.shape == (7, 4, 8) and out.dtype == expected
    np.testing.assert_array_equal(out, arr)


def test_from_sglang_dense_layers_and_num_experts_dtype() -> None:
    compact = ids(5, 2, 2, high=8, dtype="uint8")
    payload = sglang_payload(sglang_full(compact, [1, 3], 4))
    out = from_sglang(payload, [1, 3], 4, 2, num_rows=5)
    assert out.dtype == np.uint8 and out.shape == (5, 2, 2)
    np.testing.assert_array_equal(out, compact)
    # num_experts pins the engine's dtype rule whatever ids this payload happens to use
    assert from_sglang(payload, [1, 3], 4, 2, num_experts=300).dtype == np.uint16
    assert from_sglang(payload, [1, 3], 4, 2, num_experts=8).dtype == np.uint8
    with pytest.raises(ValueError, match="num_experts=4"):
        from_sglang(sglang_payload(sglang_full(np.full((1, 2, 2), 5), [1, 3], 4)), [1, 3], 4, 2, num_experts=4)


@pytest.mark.parametrize("bad", [-1, 70000])
def test_from_sglang_rejects_ids_the_compact_form_cannot_hold(bad: int) -> None:
    arr = ids(3, 2, 2, high=16, dtype="int32")
    arr[1, 0, 1] = bad
    with pytest.raises(ValueError, match="negative" if bad < 0 else "uint16"):
        from_sglang(sglang_payload(arr), [0, 1], 2, 2)


def test_to_sglang_round_trip_and_validation() -> None:
    compact = ids(6, 3, 2, high=300, dtype="uint16")
    payload = to_sglang(compact, [0, 2, 5], 6)
    raw = np.frombuffer(base64.b64decode(payload), dtype="<i4").reshape(6, 6, 2)
    np.testing.assert_array_equal(raw[:, [0, 2, 5]], compact)
    assert not raw[:, [1, 3, 4]].any()
    np.testing.assert_array_equal(from_sglang(payload, [0, 2, 5], 6, 2), compact)
    assert to_sglang(compact[:0], [0, 2, 5], 6) == ""
    for args, field in [((compact, [0, 2], 6), "moe_layer_ids"), ((compact, [0, 5, 2], 6), "strictly increasing"),
                        ((compact, [0, 2, 6], 6), "num_hidden_layers"), ((compact, [-1, 2, 5], 6), "outside"),
                        ((compact[0], [0, 2, 5], 6), "shape"), ((compact.astype(np.float32), [0, 2, 5], 6), "dtype"),
                        ((compact.astype(np.int64) - 1, [0, 2, 5], 6), "int32"), ((compact, [0, 2, 5], 0), ">= 1")]:
        with pytest.raises(ValueError, match=field):
            to_sglang(*args)
    with pytest.raises(TypeError, match="moe_layer_ids"):
        to_sglang(compact, 3, 6)  # type: ignore[arg-type]


def test_from_sglang_empty_and_bad_length() -> None:
    assert from_sglang("", [0, 1, 2], 3, 2).shape == (0, 3, 2)
    assert from_sglang("", [1], 3, 2, num_rows=0).dtype == np.uint8
    payload = sglang_payload(ids(5, 3, 2, high=8, dtype="int32"))
    with pytest.raises(ValueError, match="multiple"):
        from_sglang(payload, [0, 1, 2, 3], 4, 2)
    with pytest.raises(ValueError, match="num_rows=4"):
        from_sglang(payload, [0, 1, 2], 3, 2, num_rows=4)
    with pytest.raises(ValueError, match="routed_experts"):
        from_sglang("***", [0, 1, 2], 3, 2)


def test_from_sglang_old_signature_is_a_type_error() -> None:
    """from_sglang(b64, num_moe_layers, top_k) cannot place dense layers: it must not run at all."""
    payload = sglang_payload(ids(4, 2, 2, high=8, dtype="int32"))
    for call in (lambda: from_sglang(payload, 2, 2), lambda: from_sglang(payload, 2, 4, 2),
                 lambda: from_sglang(payload, np.int64(2), 2)):
        with pytest.raises(TypeError, match="moe_layer_ids"):
            call()
    with pytest.raises(TypeError, match="top_k"):
        from_sglang(payload, [0, 1], 2)
    with pytest.raises(TypeError):
        from_sglang(payload, num_moe_layers=2, top_k=2)  # type: ignore[call-arg]


# vLLM (--enable-return-routed-experts) returns routed_experts as the base64 of np.save() bytes of a
# uint8 (E <= 256) or uint16 array [T, L, K]; some clients wrap it in a dict with a "data" field.
def vllm_payload(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.mark.parametrize("dtype,high,expected", [("uint8", 128, np.uint8), ("uint16", 512, np.uint16),
                                                 ("uint16", 100, np.uint8)])
def test_from_vllm(dtype: str, high: int, expected: type) -> None:
    arr = ids(6, 3, 4, high=high, dtype=dtype, seed=high)
    arr[0, 0, 0] = high - 1
    for obj in (vllm_payload(arr), {"data": vllm_payload(arr)},
                {"dtype": dtype, "shape": [6, 3, 4], "data": vllm_payload(arr)}):
        out = from_vllm(obj)
        assert out.dtype == expected and out.shape == (6, 3, 4)
        np.testing.assert_array_equal(out, arr)


def test_from_vllm_rejects_bad_input() -> None:
    arr = ids(2, 2, 2, high=8, dtype="uint8")
    with pytest.raises(ValueError, match="shape"):
        from_vllm({"dtype": "uint8", "shape": [9, 2, 2], "data": vllm_payload(arr)})
    with pytest.raises(ValueError, match="data"):
        from_vllm({"dtype": "uint8"})
    with pytest.raises(ValueError):
        from_vllm(vllm_payload(arr.astype(np.float32)))
