"""Routing replay / record on tiny random transformers MoE models of every supported family.

What the routers chose is read from the arguments the experts module receives (a forward
pre-hook), never from the patch's own state.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from routereplay.replay import SUPPORTED_FAMILIES, RoutingReplay, align, align_packed

VOCAB = 64
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)


_MOE = dict(intermediate_size=48, moe_intermediate_size=16, num_experts_per_tok=2)
_GROUPED = dict(_MOE, num_hidden_layers=3, n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1,
                n_shared_experts=1, routed_scaling_factor=2.5)
# One tiny config per family; each mixes dense and MoE layers where the family allows it.
FAMILY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(_COMMON, **_MOE, num_hidden_layers=4, num_experts=8, decoder_sparse_step=2, norm_topk_prob=True),
    "qwen2_moe": dict(_COMMON, **_MOE, shared_expert_intermediate_size=16, num_hidden_layers=2, num_experts=8,
                      norm_topk_prob=False),
    "olmoe": dict(_COMMON, intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True),
    "mixtral": dict(_COMMON, intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
    # moe_norm_min above a top-2 probability mass, so the clamp is exercised.
    "ernie4_5_moe": dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                         moe_num_experts=8, moe_k=2, moe_layer_start_index=1, moe_num_shared_experts=1,
                         moe_norm_min=0.9),
    "glm4_moe": dict(_COMMON, **_GROUPED, norm_topk_prob=True),
    "deepseek_v3": dict(_COMMON, **_GROUPED, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "gpt_oss": dict(_COMMON, intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                    layer_types=["full_attention", "sliding_attention"]),
}


def _config(family: str, **overrides: object) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(family, **{**FAMILY_CONFIGS[family], **overrides})


EXPECTED_MOE_LAYERS = {
    "qwen3_moe": [1, 3],  # decoder_sparse_step=2
    "qwen2_moe": [0, 1],
    "olmoe": [0, 1],
    "mixtral": [0, 1],
    "ernie4_5_moe": [1, 2],  # moe_layer_start_index=1
    "glm4_moe": [1, 2],  # first_k_dense_replace=1
    "deepseek_v3": [1, 2],
    "gpt_oss": [0, 1],
}


def build(family: str, dtype: torch.dtype = torch.float32, **overrides: object) -> nn.Module:
    """A tiny random model; selection-only biases get random values so that using them matters."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(_config(family, **overrides))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.3, 0.3)
            if type(module).__name__ == "GptOssTopKRouter":
                module.bias.uniform_(-0.5, 0.5)
    return model.to(dtype).eval()


def random_routing(rr: RoutingReplay, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    """Distinct random ids per (token, layer) row, ``[B, T, L, K]`` int64."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, seq, len(rr.moe_layer_ids), rr.num_experts, generator=generator)
    return scores.argsort(dim=-1)[..., : rr.top_k]


def token_ids(batch: int, seq: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@contextmanager
def expert_calls(
    model: nn.Module, rr: RoutingReplay
) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Capture (top_k_index, top_k_weights) as each MoE layer's experts module receives them."""
    calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in rr.moe_layer_ids]
    handles = []
    for layer, layer_id in enumerate(rr.moe_layer_ids):
        experts = model.model.layers[layer_id].mlp.experts

        def hook(_: nn.Module, args: tuple, layer: int = layer) -> None:
            calls[layer].append((args[1].detach().clone(), args[2].detach().clone()))

        handles.append(experts.register_forward_pre_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def router_inputs(model: nn.Module, rr: RoutingReplay) -> Iterator[list[torch.Tensor]]:
    """Capture the hidden states each router receives, flattened to [N, H]."""
    inputs: list[torch.Tensor] = [torch.empty(0)] * len(rr.moe_layer_ids)
    handles = []
    for layer, layer_id in enumerate(rr.moe_layer_ids):
        router = model.model.layers[layer_id].mlp.gate

        def hook(_: nn.Module, args: tuple, layer: int = layer) -> None:
            inputs[layer] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()

        handles.append(router.register_forward_pre_hook(hook))
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def flat(routing: torch.Tensor, layer: int) -> torch.Tensor:
    return routing[:, :, layer].reshape(-1, routing.shape[-1]).long()


def test_supported_families_are_all_covered() -> None:
    assert set(SUPPORTED_FAMILIES) == set(EXPECTED_MOE_LAYERS)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_finds_routers_and_model_facts(family: str) -> None:
    rr = RoutingReplay(build(family))
    assert rr.family == family
    assert rr.moe_layer_ids == EXPECTED_MOE_LAYERS[family]
    assert (rr.num_experts, rr.top_k) == (8, 2)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_replaying_recorded_routing_reproduces_logits_exactly(family: str) -> None:
    model = build(family)
    rr = RoutingReplay(model)
    ids = token_ids(2, 7)
    with torch.no_grad():
        native = model(ids).logits
        with expert_calls(model, rr) as native_calls, rr.record() as record:
            recorded_logits = model(ids).logits
        routing = record.routing
        assert routing.shape == (2, 7, len(rr.moe_layer_ids), 2) and routing.dtype == torch.int64
        for layer, calls in enumerate(native_calls):
            assert torch.equal(calls[0][0], flat(routing, layer))
        with rr.replay(routing.numpy().astype(np.uint8)):
            replayed = model(ids).logits
    assert torch.equal(recorded_logits, native)
    assert torch.equal(replayed, native)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_replay_makes_routers_use_given_experts_and_keeps_router_gradients(family: str) -> None:
    model = build(family).train()
    rr = RoutingReplay(model)
    ids = token_ids(2, 6)
    routing = random_routing(rr, 2, 6)
    with torch.no_grad():
        native = model(ids).logits
    with expert_calls(model, rr) as calls, rr.replay(routing):
        logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    for layer, layer_calls in enumerate(calls):
        assert len(layer_calls) == 1
        assert torch.equal(layer_calls[0][0], flat(routing, layer))
    assert not torch.allclose(logits, native)
    for layer_id in rr.moe_layer_ids:
        mlp = model.model.layers[layer_id].mlp
        router = mlp.router if family == "gpt_oss" else mlp.gate
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    for router in rr._routers:
        assert "forward" not in router.__dict__  # native forward restored


def replay_and_capture(model: nn.Module, rr: RoutingReplay, ids: torch.Tensor, routing: torch.Tensor):
    """Replay `routing` and return (each router's inputs, each experts module's calls)."""
    with torch.no_grad(), router_inputs(model, rr) as hidden, expert_calls(model, rr) as calls, rr.replay(routing):
        model(ids)
    return hidden, calls


def _softmax_reference(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, normalise: bool
) -> torch.Tensor:
    scores = hidden @ weight.T
    if normalise:  # R3: g_i = mask_i exp(s_i) / sum_j mask_j exp(s_j)
        chosen = scores.gather(1, ids).exp()
        return chosen / chosen.sum(dim=-1, keepdim=True)
    return scores.exp().gather(1, ids) / scores.exp().sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("normalise", [True, False])
def test_qwen3_gate_weights_follow_softmax_formula(normalise: bool) -> None:
    model = build("qwen3_moe", norm_topk_prob=normalise)
    rr = RoutingReplay(model)
    ids, routing = token_ids(2, 5), random_routing(rr, 2, 5)
    hidden, calls = replay_and_capture(model, rr, ids, routing)
    for layer, layer_id in enumerate(rr.moe_layer_ids):
        weight = model.model.layers[layer_id].mlp.gate.weight
        expected = _softmax_reference(hidden[layer], weight, flat(routing, layer), normalise)
        torch.testing.assert_close(calls[layer][0][1], expected, rtol=1e-5, atol=1e-7)


def test_glm4_gate_weights_follow_sigmoid_formula_without_correction_bias() -> None:
    model = build("glm4_moe")
    rr = RoutingReplay(model)
    ids, routing = token_ids(2, 5), random_routing(rr, 2, 5)
    hidden, calls = replay_and_capture(model, rr, ids, routing)
    for layer, layer_id in enumerate(rr.moe_layer_ids):
        gate = model.model.layers[layer_id].mlp.gate
        chosen = (hidden[layer] @ gate.weight.T).sigmoid().gather(1, flat(routing, layer))
        expected = 2.5 * chosen / chosen.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(calls[layer][0][1], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_bf16_and_train_mode_replay_of_recorded_routing_is_exact(family: str) -> None:
    model = build(family, dtype=torch.bfloat16).train()
    rr = RoutingReplay(model)
    ids = token_ids(2, 7)
    with rr.record() as record:
        native = model(ids).logits
    with rr.replay(record.routing):
        replayed = model(ids).logits
    assert torch.equal(replayed, native)


def test_masked_tokens_route_natively() -> None:
    model = build("qwen3_moe")
    rr = RoutingReplay(model)
    ids = token_ids(2, 6)
    routing = random_routing(rr, 2, 6)
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[0, 0], mask[1, -1] = True, False
    routing[~mask] = 0  # never replayed, so invalid rows (duplicate ids) are fine
    with torch.no_grad(), router_inputs(model, rr) as hidden, expert_calls(model, rr) as calls:
        with rr.replay(routing, mask=mask):
            model(ids)
    flat_mask = mask.reshape(-1)
    for layer in range(len(rr.moe_layer_ids)):
        used = calls[layer][0][0]
        weight = model.model.layers[rr.moe_layer_ids[layer]].mlp.gate.weight
        native = torch.topk(torch.softmax(hidden[layer] @ weight.T, dim=-1), 2, dim=-1).indices
        assert torch.equal(used[flat_mask], flat(routing, layer)[flat_mask])
        assert torch.equal(used[~flat_mask], native[~flat_mask])

    with torch.no_grad():
        native_logits = model(ids).logits
        with rr.replay(routing, mask=torch.zeros(2, 6, dtype=torch.bool)):
            assert torch.equal(model(ids).logits, native_logits)


def _standalone_logits(model: nn.Module, rr: RoutingReplay, seqs: list[torch.Tensor], routings: list) -> list:
    """Each sample alone, unpadded, replaying its own routing (its last token routes natively)."""
    out = []
    with torch.no_grad():
        for seq, sample_routing in zip(seqs, routings, strict=True):
            routing, mask = align([sample_routing], [len(seq)])
            with rr.replay(routing, mask):
                out.append(model(seq[None]).logits[0])
    return out


def _sample_routings(rr: RoutingReplay, lengths: list[int]) -> list[np.ndarray]:
    return [
        random_routing(rr, 1, n - 1, seed=10 + i)[0].numpy().astype(np.uint8) for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_replays_each_sample_as_alone(padding_side: str) -> None:
    model = build("qwen3_moe")
    rr = RoutingReplay(model)
    lengths = [5, 7, 3]
    seqs = [token_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    samples = _sample_routings(rr, lengths)
    expected = _standalone_logits(model, rr, seqs, samples)

    total = 8
    input_ids = torch.zeros(3, total, dtype=torch.long)
    attention_mask = torch.zeros(3, total, dtype=torch.long)
    for i, seq in enumerate(seqs):
        span = slice(0, len(seq)) if padding_side == "right" else slice(total - len(seq), total)
        input_ids[i, span], attention_mask[i, span] = seq, 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    routing, mask = align(samples, lengths, padding_side=padding_side, total_length=total)
    with torch.no_grad(), expert_calls(model, rr) as calls, rr.replay(routing, mask):
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    flat_mask = mask.reshape(-1)
    for layer in range(len(rr.moe_layer_ids)):
        assert torch.equal(calls[layer][0][0][flat_mask], flat(routing, layer)[flat_mask])
    for i, seq in enumerate(seqs):
        span = slice(0, len(seq)) if padding_side == "right" else slice(total - len(seq), total)
        torch.testing.assert_close(logits[i, span], expected[i], rtol=1e-4, atol=1e-5)


def test_packed_row_replays_each_sample_as_alone() -> None:
    model = build("glm4_moe")
    rr = RoutingReplay(model)
    lengths = [4, 6, 3]
    seqs = [token_ids(1, n, seed=30 + i)[0] for i, n in enumerate(lengths)]
    samples = _sample_routings(rr, lengths)
    expected = _standalone_logits(model, rr, seqs, samples)

    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    routing, mask = align_packed(samples, lengths)
    assert routing.shape[:2] == (1, sum(lengths))
    with torch.no_grad(), rr.replay(routing, mask):
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
    start = 0
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits[0, start : start + n], expected[i], rtol=1e-4, atol=1e-5)
        start += n


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable after 5.17."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _router_grads(model: nn.Module, rr: RoutingReplay) -> list[torch.Tensor]:
    return [router.weight.grad.clone() for router in rr._routers]


def test_gradient_checkpointing_recomputes_with_replayed_experts() -> None:
    model = build("qwen3_moe").train()
    rr = RoutingReplay(model)
    ids, routing = token_ids(2, 6), random_routing(rr, 2, 6)
    with rr.replay(routing):
        model(ids).logits.pow(2).mean().backward()
    expected = _router_grads(model, rr)

    model.zero_grad()
    enable_checkpointing(model)
    with expert_calls(model, rr) as calls, rr.replay(routing):
        model(ids, use_cache=False).logits.pow(2).mean().backward()
    for layer, layer_calls in enumerate(calls):
        assert len(layer_calls) == 2  # forward + recomputation in backward
        assert all(torch.equal(index, flat(routing, layer)) for index, _ in layer_calls)
    for got, want in zip(_router_grads(model, rr), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)

    # Backward after the context exited: the recompute still replays (the routing travels with the graph).
    model.zero_grad()
    with expert_calls(model, rr) as calls:
        with rr.replay(routing):
            loss = model(ids, use_cache=False).logits.pow(2).mean()
        loss.backward()
    for layer, layer_calls in enumerate(calls):
        assert len(layer_calls) == 2
        assert all(torch.equal(index, flat(routing, layer)) for index, _ in layer_calls)
    for got, want in zip(_router_grads(model, rr), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_records_each_forward_once(use_reentrant: bool) -> None:
    model = build("qwen3_moe").train()
    rr = RoutingReplay(model)
    ids = token_ids(2, 6)
    with torch.no_grad(), rr.record() as reference:
        model(ids)
    enable_checkpointing(model, use_reentrant)
    model.enable_input_require_grads()
    with rr.record() as record:
        model(ids, use_cache=False).logits.pow(2).mean().backward()
    assert len(record.routings) == 1
    assert torch.equal(record.routing, reference.routing)


def test_record_keeps_one_routing_per_forward() -> None:
    model = build("olmoe")
    rr = RoutingReplay(model)
    with torch.no_grad(), rr.record() as record:
        model(token_ids(2, 5))
        model(token_ids(1, 3))
    assert [tuple(r.shape[:2]) for r in record.routings] == [(2, 5), (1, 3)]
    with pytest.raises(ValueError, match="2 forwards"):
        _ = record.routing


def test_contexts_do_not_nest_and_restore_on_error() -> None:
    model = build("mixtral")
    rr = RoutingReplay(model)
    with rr.record(), pytest.raises(RuntimeError, match="do not nest"), rr.replay(random_routing(rr, 1, 3)):
        pass
    with pytest.raises(ZeroDivisionError), rr.replay(random_routing(rr, 1, 3)):
        raise ZeroDivisionError
    assert all("forward" not in router.__dict__ for router in rr._routers)


def test_unsupported_model_is_refused() -> None:
    config = transformers.LlamaConfig(**_COMMON, intermediate_size=16, num_hidden_layers=1)
    with pytest.raises(ValueError, match="model_type 'llama'.*not supported"):
        RoutingReplay(transformers.AutoModelForCausalLM.from_config(config))


@pytest.fixture(scope="module")
def qwen3() -> tuple[nn.Module, RoutingReplay]:
    model = build("qwen3_moe")
    return model, RoutingReplay(model)


def _replay_batch(qwen3: tuple[nn.Module, RoutingReplay], routing: object, mask: object = None) -> None:
    model, rr = qwen3
    with torch.no_grad(), rr.replay(routing, mask):
        model(token_ids(2, 5))


def test_bad_routing_wrong_number_of_layers(qwen3: tuple) -> None:
    with pytest.raises(ValueError, match="3 MoE layers, the model has 2"):
        _replay_batch(qwen3, torch.zeros(2, 5, 3, 2, dtype=torch.long))


def test_bad_routing_wrong_k(qwen3: tuple) -> None:
    with pytest.raises(ValueError, match="K=3 .* top-2"):
        _replay_batch(qwen3, random_routing(qwen3[1], 2, 5)[..., [0, 1, 1]])


def test_bad_routing_id_out_of_range(qwen3: tuple) -> None:
    routing = random_routing(qwen3[1], 2, 5)
    routing[1, 3, 1, 0] = 8
    with pytest.raises(ValueError, match=r"sample 1, position 3, MoE layer 1: .*outside \[0, 8\)"):
        _replay_batch(qwen3, routing)


def test_bad_routing_duplicate_ids(qwen3: tuple) -> None:
    routing = random_routing(qwen3[1], 2, 5)
    routing[0, 2, 0] = torch.tensor([4, 4])
    with pytest.raises(ValueError, match=r"sample 0, position 2, MoE layer 0: duplicate expert ids \[4, 4\]"):
        _replay_batch(qwen3, routing)


def test_bad_routing_shorter_than_batch(qwen3: tuple) -> None:
    with pytest.raises(ValueError, match="sample 0, position 4, MoE layer 0: routing is shorter"):
        _replay_batch(qwen3, random_routing(qwen3[1], 2, 4))
    with pytest.raises(ValueError, match="sample 1, position 0, MoE layer 0: routing is shorter"):
        _replay_batch(qwen3, random_routing(qwen3[1], 1, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_bad_routing_wrong_dtype(qwen3: tuple, dtype: type) -> None:
    routing = random_routing(qwen3[1], 2, 5).numpy().astype(dtype)
    with pytest.raises(ValueError, match="not an integer dtype"):
        _replay_batch(qwen3, routing)
    with pytest.raises(ValueError, match="not an integer dtype"):
        _replay_batch(qwen3, torch.from_numpy(routing))


def test_bad_mask_shape(qwen3: tuple) -> None:
    with pytest.raises(ValueError, match="mask shape"):
        _replay_batch(qwen3, random_routing(qwen3[1], 2, 5), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_cuda_bf16_replay_and_checkpointed_record(family: str) -> None:
    model = build(family, dtype=torch.bfloat16).cuda().train()
    enable_checkpointing(model)
    rr = RoutingReplay(model)
    ids = token_ids(2, 16).cuda()
    with rr.record() as record:
        native = model(ids, use_cache=False).logits
        native.float().pow(2).mean().backward()
    assert len(record.routings) == 1  # recomputation on the CUDA backward thread is not recorded
    with rr.replay(record.routing):
        replayed = model(ids, use_cache=False).logits
        replayed.float().pow(2).mean().backward()
    assert torch.equal(replayed, native)
    routing = random_routing(rr, 2, 16).cuda()
    with expert_calls(model, rr) as calls, rr.replay(routing):
        model(ids, use_cache=False).logits.float().pow(2).mean().backward()
    for layer, layer_calls in enumerate(calls):
        assert len(layer_calls) == 2 and all(torch.equal(i, flat(routing, layer)) for i, _ in layer_calls)
