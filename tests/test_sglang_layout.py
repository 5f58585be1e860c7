"""SGLang's ``meta_info["routed_experts"]`` layout, written and read exactly, for models with dense layers.

What we reproduce (read, not copied):

- SGLang ``python/sglang/srt/layers/moe/routed_experts_capturer.py``: the capture buffers are
  ``torch.zeros((num_tokens, hf_text_config.num_hidden_layers, num_experts_per_tok), dtype=torch.int32)``
  and each MoE layer writes ``buffer[:, layer_id, :]``, so every decoder layer has a slot and a dense layer's
  stays zero; the response is the base64 of those int32 bytes, rows ``[routed_experts_start_len, seqlen - 1)``.
- slime ``slime/utils/misc.py`` ``decode_int32_meta_array`` (base64 -> ``torch.frombuffer(..., torch.int32)``)
  and ``slime/utils/types.py`` ``Sample._apply_meta_info``: checks ``numel == (len(tokens) - 1 - start_len) *
  args.num_layers * args.moe_router_topk`` and reshapes to ``[rows, num_layers, topk]``, num_layers counting
  every layer (dense included) and the layer axis indexed by absolute layer id.

The checkpoints are real ones, written by transformers (``routereplay.tiny.make_tiny_checkpoint``), with the
dense-layer settings passed explicitly so the test does not lean on tiny.py's defaults.
"""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from routereplay.routing import from_sglang, routing_dtype, to_sglang
from routereplay.tiny import make_tiny_checkpoint

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]

# family -> (overrides that make dense layers, model layer ids that must be MoE given 4 layers)
MODELS = {
    "glm4_moe": (dict(first_k_dense_replace=1), [1, 2, 3]),
    "qwen3_moe": (dict(decoder_sparse_step=2, mlp_only_layers=[]), [1, 3]),
}


def expected_moe_layers(hf: dict) -> list[int]:
    """The MoE layers from the config.json transformers wrote, by each family's rule (not our ModelConfig)."""
    n = hf["num_hidden_layers"]
    if hf["model_type"] == "glm4_moe":
        return list(range(hf["first_k_dense_replace"], n))
    dense = set(hf.get("mlp_only_layers") or [])
    return [i for i in range(n) if i not in dense and (i + 1) % hf["decoder_sparse_step"] == 0]


def slime_decode(payload: str, tokens: list[int], start_len: int, num_layers: int, topk: int) -> torch.Tensor:
    """What slime does with the payload: frombuffer int32, element-count check, reshape by ALL layers."""
    flat = torch.frombuffer(bytearray(base64.b64decode(payload.encode("ascii"))), dtype=torch.int32)
    rows = max(0, len(tokens) - 1 - start_len)
    assert flat.numel() == rows * num_layers * topk, (flat.numel(), rows, num_layers, topk)
    return flat.reshape(rows, num_layers, topk)


@pytest.fixture(scope="module", params=sorted(MODELS))
def generated(request, tmp_path_factory):
    family = request.param
    overrides, moe_ids = MODELS[family]
    d = make_tiny_checkpoint(str(tmp_path_factory.mktemp("sglang_layout") / family), family, **overrides)
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    assert expected_moe_layers(hf) == moe_ids and len(moe_ids) < hf["num_hidden_layers"]  # dense layers exist
    llm = LLM(d, max_model_len=128, block_size=8, routing_replay={"enable": True})
    try:
        params = SamplingParams(max_tokens=6, return_routed_experts=True, temperature=1.0, seed=0)
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
        later = SamplingParams(max_tokens=6, return_routed_experts=True, temperature=1.0, seed=0,
                               routed_experts_start=2)
        outs_later = llm.generate(prompt_token_ids=PROMPTS, sampling_params=later, use_tqdm=False)
        num_experts = llm.engine.model_config.num_experts
    finally:
        llm.close()
    return hf, moe_ids, num_experts, outs, outs_later


def test_to_sglang_is_sglangs_layout_and_slime_reads_it(generated) -> None:
    hf, moe_ids, num_experts, outs, _ = generated
    n_layers, top_k = hf["num_hidden_layers"], hf["num_experts_per_tok"]
    dense = [i for i in range(n_layers) if i not in moe_ids]
    for out in outs:
        assert out.moe_layer_ids == moe_ids
        c = out.outputs[0]
        compact = c.routed_experts
        tokens = out.prompt_token_ids + c.token_ids
        assert compact.shape == (len(tokens) - 1, len(moe_ids), top_k)
        assert compact.dtype == routing_dtype(num_experts)
        payload = to_sglang(compact, out.moe_layer_ids, n_layers)

        full = np.frombuffer(base64.b64decode(payload), dtype="<i4").reshape(-1, n_layers, top_k)
        assert full.shape[0] == len(out.prompt_token_ids) + len(c.token_ids) - 1
        assert not full[:, dense, :].any()  # SGLang's zero-filled dense slots
        np.testing.assert_array_equal(full[:, moe_ids, :], compact)

        routed = slime_decode(payload, tokens, 0, n_layers, top_k)
        for j, layer in enumerate(moe_ids):  # slime indexes the layer axis by absolute layer id
            np.testing.assert_array_equal(routed[:, layer, :].numpy(), compact[:, j, :])

        back = from_sglang(payload, out.moe_layer_ids, n_layers, top_k, num_rows=len(tokens) - 1,
                           num_experts=num_experts)
        assert back.dtype == compact.dtype and back.shape == compact.shape
        np.testing.assert_array_equal(back, compact)
        np.testing.assert_array_equal(from_sglang(payload, moe_ids, n_layers, top_k), compact)


def test_routed_experts_start_len_rows(generated) -> None:
    """Rows from routed_experts_start_len: T = prompt_len + output_len - 1 - start, as slime counts them."""
    hf, moe_ids, _, _, outs_later = generated
    n_layers, top_k = hf["num_hidden_layers"], hf["num_experts_per_tok"]
    for out in outs_later:
        c = out.outputs[0]
        assert c.routed_experts_start == 2
        tokens = out.prompt_token_ids + c.token_ids
        payload = to_sglang(c.routed_experts, out.moe_layer_ids, n_layers)
        routed = slime_decode(payload, tokens, 2, n_layers, top_k)
        assert routed.shape[0] == len(out.prompt_token_ids) + len(c.token_ids) - 1 - 2
        np.testing.assert_array_equal(routed[:, moe_ids, :].numpy(), c.routed_experts)
        back = from_sglang(payload, moe_ids, n_layers, top_k, num_rows=len(tokens) - 1 - 2)
        np.testing.assert_array_equal(back, c.routed_experts)


def test_wrong_layout_fails_loudly(generated) -> None:
    hf, moe_ids, _, outs, _ = generated
    n_layers, top_k = hf["num_hidden_layers"], hf["num_experts_per_tok"]
    c = outs[0].outputs[0]
    rows = c.routed_experts.shape[0]
    payload = to_sglang(c.routed_experts, moe_ids, n_layers)
    for wrong_n in (n_layers - 1, n_layers + 1, n_layers * 2):  # wrong num_hidden_layers
        with pytest.raises(ValueError):
            from_sglang(payload, [i for i in moe_ids if i < wrong_n], wrong_n, top_k, num_rows=rows)
    with pytest.raises(ValueError, match="dense"):  # a MoE layer called dense (ids shifted down by one)
        from_sglang(payload, [i - 1 for i in moe_ids], n_layers, top_k)
    with pytest.raises(ValueError, match="dense"):  # a dense layer called MoE (every layer listed)
        from_sglang(payload, list(range(n_layers)), n_layers, top_k)
    with pytest.raises(ValueError, match="dense"):  # a MoE layer left out
        from_sglang(payload, moe_ids[1:], n_layers, top_k)
    with pytest.raises(ValueError, match="moe_layer_ids"):  # negative / out-of-range ids
        from_sglang(payload, [-1, *moe_ids[1:]], n_layers, top_k)
    raw = base64.b64decode(payload)
    for cut in (4, 4 * n_layers * top_k):  # truncated payloads: mid-row and by a whole row
        short = base64.b64encode(raw[:-cut]).decode()
        with pytest.raises(ValueError, match="multiple" if cut == 4 else "num_rows"):
            from_sglang(short, moe_ids, n_layers, top_k, num_rows=rows)
    with pytest.raises(ValueError, match="moe_layer_ids"):
        to_sglang(c.routed_experts, moe_ids[:-1], n_layers)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        to_sglang(c.routed_experts, moe_ids, max(moe_ids))
    with pytest.raises(TypeError, match="moe_layer_ids"):  # the old signature
        from_sglang(payload, len(moe_ids), top_k)


@pytest.mark.parametrize("num_layers,moe_ids,rows", [(4, [1, 3], 8), (4, [1, 2, 3], 3)])
def test_hand_built_payload_the_old_reader_misread(num_layers: int, moe_ids: list[int], rows: int) -> None:
    """A real-layout payload for a model with dense layers, which the old ``from_sglang(b64, L_moe, K)`` misread.

    The old reader reshaped the int32 stream to ``[-1, num_moe_layers, K]``. SGLang writes ``num_hidden_layers``
    slots per row, so whenever ``rows * num_hidden_layers`` is a multiple of ``num_moe_layers`` the length
    check passed and the reshape silently re-cut the stream: for qwen3-style layers [1, 3] of 4 (8 rows, K=2)
    it returned 16 rows x 2 layers x 2, each of our "rows" holding a dense layer's zeros beside one MoE layer,
    half of every token's routing shifted into the next row; for glm4-style [1, 2, 3] of 4 (3 rows) it
    returned 4 rows x 3 x 2, again with no error. The new reader places the columns by layer id.
    """
    k = 2
    rng = np.random.default_rng(rows)
    compact = np.stack([np.stack([rng.choice(8, k, replace=False) for _ in moe_ids]) for _ in range(rows)])
    full = np.zeros((rows, num_layers, k), dtype="<i4")
    full[:, moe_ids, :] = compact  # as SGLang's capturer fills its buffer
    payload = base64.b64encode(full.tobytes()).decode()
    assert payload == to_sglang(compact.astype(np.uint8), moe_ids, num_layers)

    flat = np.frombuffer(base64.b64decode(payload), dtype="<i4")
    assert flat.size % (len(moe_ids) * k) == 0  # the old length check passed ...
    old_view = flat.reshape(-1, len(moe_ids), k)  # ... and this is what the old reader returned
    assert old_view.shape[0] != rows and old_view.shape != compact.shape
    new = from_sglang(payload, moe_ids, num_layers, k, num_rows=rows)
    assert new.shape == (rows, len(moe_ids), k) and new.dtype == np.uint8
    np.testing.assert_array_equal(new, compact)
    with pytest.raises(TypeError, match="moe_layer_ids"):
        from_sglang(payload, len(moe_ids), k)
