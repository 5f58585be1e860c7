"""Replay is loud by default: every way it could quietly not happen is an error naming what it found.

Also: routers found by class hierarchy (renaming wrappers), the per-context coverage report, and the
load-balancing loss counted on the replayed selection.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

import routereplay.replay.hf as hf
from routereplay.replay import ReplayReport, RoutingReplay
from tests.test_replay import _COMMON, build, enable_checkpointing, random_routing, token_ids
from tests.test_replay_wrapped import used_experts


def test_routers_are_found_through_class_renaming() -> None:
    """FSDP2 and parametrize swap a module's class for a subclass with another name."""
    model = build("qwen3_moe")
    for layer_id in (1, 3):
        router = model.model.layers[layer_id].mlp.gate
        router.__class__ = type(f"FSDP{type(router).__name__}", (type(router),), {})
    model.__class__ = type(f"FSDP{type(model).__name__}", (type(model),), {})
    rr = RoutingReplay(model)
    assert rr.family == "qwen3_moe" and rr.moe_layer_ids == [1, 3]
    routing = random_routing(rr, 2, 5)
    with torch.no_grad(), used_experts(model) as calls, rr.replay(routing):
        model(token_ids(2, 5))
    assert torch.equal(calls[3][0], routing[:, :, 1].reshape(-1, 2))


def test_unsupported_model_names_what_looks_like_a_router() -> None:
    config = transformers.LlamaConfig(**_COMMON, intermediate_size=16, num_hidden_layers=1)
    llama = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="model_type 'llama'.*not supported.*no module looks like a router"):
        RoutingReplay(llama)

    class MyTopKRouter(nn.Module):
        top_k = 2

    llama.model.layers[0].mlp.gate = MyTopKRouter()
    with pytest.raises(ValueError, match=r"not of a supported family: model\.layers\.0\.mlp\.gate \(MyTopKRouter\)"):
        RoutingReplay(llama)


def test_context_never_exited_is_refused_naming_where_it_was_entered() -> None:
    model = build("mixtral")
    rr = RoutingReplay(model)
    routing = random_routing(rr, 1, 3)
    forgotten = rr.replay(routing)
    forgotten.__enter__()
    with pytest.raises(RuntimeError, match=r"do not nest: a replay\(\) context entered at .*test_replay_loud\.py:\d+ "
                                           r"is still open \(never exited\?\)"):
        with rr.replay(routing):
            pass
    with torch.no_grad():
        model(token_ids(1, 3))
    forgotten.__exit__(None, None, None)
    with torch.no_grad(), rr.replay(routing):  # usable again once exited
        model(token_ids(1, 3))


def test_a_context_with_no_forward_is_refused() -> None:
    rr = RoutingReplay(build("qwen3_moe"))
    with pytest.raises(RuntimeError, match=r"no forward of the model ran inside rr\.replay\(\)"):
        with rr.replay(random_routing(rr, 1, 3)):
            pass
    with pytest.warns(UserWarning, match="no forward of the model ran"):
        with rr.replay(random_routing(rr, 1, 3), strict=False):
            pass


def test_a_router_called_outside_the_model_forward_is_refused() -> None:
    model = build("qwen3_moe")
    rr = RoutingReplay(model)
    with torch.no_grad(), rr.replay(random_routing(rr, 2, 5)):
        with pytest.raises(RuntimeError, match=r"router of model layer 1 ran under rr\.replay\(\) outside a forward"):
            model.model.layers[1].mlp(torch.randn(2, 5, 32))
        model(token_ids(2, 5))
    with torch.no_grad():  # outside any context: native, no error
        model.model.layers[1].mlp(torch.randn(2, 5, 32))


def test_a_router_seeing_another_token_count_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's [B, T] check can be blind (an input it cannot read); the router's own count is not."""
    model = build("qwen3_moe")
    rr = RoutingReplay(model)
    monkeypatch.setattr(hf, "_batch_shape", lambda args, kwargs: None)
    with pytest.raises(ValueError, match=r"MoE layer 0 \(model layer 1\): the router received 10 tokens but the "
                                         r"routing covers B\*T = 9"):
        with torch.no_grad(), rr.replay(random_routing(rr, 1, 9)):
            model(token_ids(2, 5))


def test_batch_shape_mismatch_is_refused_before_any_layer_runs() -> None:
    model = build("glm4_moe")
    rr = RoutingReplay(model)
    with pytest.raises(ValueError, match=r"routing covers \[B, T\] = \(1, 9\) but the batch is \(1, 5\)"):
        with torch.no_grad(), rr.replay(random_routing(rr, 1, 9)):
            model(token_ids(1, 5))


def test_building_twice_on_one_model_keeps_one_set_of_hooks() -> None:
    model = build("qwen3_moe")
    first = RoutingReplay(model)
    second = RoutingReplay(model)
    router = model.model.layers[1].mlp.gate
    assert len(router._forward_hooks) == 1
    with pytest.raises(RuntimeError, match="closed"), first.replay(random_routing(first, 1, 3)):
        pass
    with torch.no_grad(), used_experts(model) as calls, second.replay(routing := random_routing(second, 1, 3)):
        model(token_ids(1, 3))
    assert torch.equal(calls[1][0], routing[:, :, 0].reshape(-1, 2))
    second.close()
    assert not router._forward_hooks and not model.model._forward_pre_hooks


def test_report_counts_coverage_fallbacks_and_recomputes() -> None:
    model = build("qwen3_moe").train()
    rr = RoutingReplay(model)
    enable_checkpointing(model)
    routing = random_routing(rr, 2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, -1] = mask[1, -2:] = False
    with rr.replay(routing, mask) as report:
        assert isinstance(report, ReplayReport)
        first = model(token_ids(2, 6), use_cache=False).logits
        second = model(token_ids(2, 6, seed=5), use_cache=False).logits
    assert report.as_dict() == {
        "replay/moe_layers": 2, "replay/forwards": 2, "replay/layers_replayed": 2, "replay/tokens": 12,
        "replay/tokens_replayed": 9, "replay/tokens_fell_back": 3, "replay/recomputed_layers": 0,
    }
    (first.pow(2).mean() + second.pow(2).mean()).backward()
    assert report.recomputed_layers == 4  # 2 forwards x 2 MoE layers, recomputed after the context exited


def test_recording_with_reentrant_checkpointing_and_backward_after_the_context_records_once() -> None:
    model = build("glm4_moe").train()
    rr = RoutingReplay(model)
    with torch.no_grad(), rr.record() as reference:
        model(token_ids(2, 6))
    enable_checkpointing(model, use_reentrant=True)
    model.enable_input_require_grads()
    with rr.record() as record:
        loss = model(token_ids(2, 6), use_cache=False).logits.pow(2).mean()
    loss.backward()
    assert torch.equal(record.routing, reference.routing)


# ------------------------------------------------------------------------------------------ aux loss


def _attention_mask() -> torch.Tensor:
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return mask


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_replayed_aux_loss_of_native_routing_equals_transformers_aux_loss(family: str) -> None:
    model = build(family)
    rr = RoutingReplay(model)
    ids, attention_mask = token_ids(2, 6), _attention_mask()
    with torch.no_grad(), rr.record() as record:
        native = model(ids, attention_mask=attention_mask, output_router_logits=True)
    with torch.no_grad(), rr.replay(record.routing, aux_loss="replayed") as report:
        model(ids, attention_mask=attention_mask)
    torch.testing.assert_close(report.load_balancing_loss(attention_mask), native.aux_loss, rtol=1e-6, atol=1e-7)


def test_replayed_aux_loss_counts_the_replayed_experts_and_trains_the_router() -> None:
    model = build("qwen3_moe").train()
    rr = RoutingReplay(model)
    ids, routing = token_ids(2, 6), random_routing(rr, 2, 6)
    logits_seen: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].mlp.gate.register_forward_hook(
            lambda _m, _a, out, i=i: logits_seen.__setitem__(i, out[0].detach()))
        for i in rr.moe_layer_ids
    ]
    with used_experts(model) as calls, rr.replay(routing, aux_loss="replayed") as report:
        native_aux = model(ids, output_router_logits=True).aux_loss
    for handle in handles:
        handle.remove()
    loss = report.load_balancing_loss()
    # By hand, from what the experts received and what the routers scored.
    counts, probs = torch.zeros(8), torch.zeros(8)
    for i in rr.moe_layer_ids:
        counts += torch.bincount(calls[i][0].reshape(-1), minlength=8).float()
        probs += torch.softmax(logits_seen[i], dim=-1).sum(0)
    rows = 2 * 12
    expected = 8 * ((counts / rows) * (probs / rows)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(loss, native_aux)  # transformers' aux_loss counts the native top-k
    loss.backward()
    assert all(model.model.layers[i].mlp.gate.weight.grad.abs().sum() > 0 for i in rr.moe_layer_ids)


def test_aux_loss_needs_the_option() -> None:
    model = build("qwen3_moe")
    rr = RoutingReplay(model)
    with torch.no_grad(), rr.replay(random_routing(rr, 1, 3)) as report:
        model(token_ids(1, 3))
    with pytest.raises(ValueError, match='aux_loss="replayed"'):
        report.load_balancing_loss()
    with pytest.raises(ValueError, match="aux_loss must be"), rr.replay(random_routing(rr, 1, 3), aux_loss="x"):
        pass


def test_strict_false_turns_coverage_errors_into_warnings() -> None:
    model = build("qwen3_moe")
    rr = RoutingReplay(model)
    old = model.model.layers[1].mlp.gate
    fresh = type(old)(model.config)
    fresh.load_state_dict(old.state_dict())
    model.model.layers[1].mlp.gate = fresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), rr.replay(random_routing(rr, 1, 3), strict=False) as report:
            model(token_ids(1, 3))
    assert any("did not reach the routers of model layers [1]" in str(w.message) for w in caught)
    assert report.layers_replayed == 1


def test_a_deep_copy_made_after_building_is_not_replayed_by_accident() -> None:
    """copy.deepcopy copies hooks (TRL's reference model is a deep copy): the copy must not be replayed by
    the original's context, and raises if run inside it; a RoutingReplay of its own replaces the copied hooks."""
    import copy

    model = build("qwen3_moe")
    rr = RoutingReplay(model)
    twin = copy.deepcopy(model)
    ids, routing = token_ids(2, 5), random_routing(rr, 2, 5)
    with torch.no_grad():
        native = model(ids).logits
        assert torch.equal(twin(ids).logits, native)
        with rr.replay(routing):
            replayed = model(ids).logits
            with pytest.raises(RuntimeError, match="a copy of the model made after RoutingReplay was built"):
                twin(ids)
        twin_rr = RoutingReplay(twin)
        assert len(twin.model.layers[1].mlp.gate._forward_hooks) == 1
        with used_experts(twin) as calls, twin_rr.replay(routing):
            assert torch.equal(twin(ids).logits, replayed)
        assert torch.equal(calls[1][0], routing[:, :, 0].reshape(-1, 2))
        with rr.replay(routing):  # the original is untouched
            assert torch.equal(model(ids).logits, replayed)


@pytest.mark.parametrize("family", sorted(hf.SUPPORTED_FAMILIES))
def test_the_step_reaches_decoder_layers_only_never_attention(family: str) -> None:
    """The step travels in the decoder layers' keyword arguments; attention must never receive it."""
    model = build(family).train()
    rr = RoutingReplay(model)
    enable_checkpointing(model, use_reentrant=False)
    received: set[str] = set()
    handles = []
    for name, module in model.named_modules():
        def hook(_: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            if hf.STEP_KWARG in kwargs:
                received.add(name)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with rr.replay(random_routing(rr, 2, 4)):
        loss = model(token_ids(2, 4), use_cache=False).logits.pow(2).mean()
    loss.backward()
    for handle in handles:
        handle.remove()
    layers = {f"model.layers.{i}" for i in range(len(model.model.layers))}
    assert received == {"model"} | layers
