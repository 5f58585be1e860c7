"""Replay through the wrappers training puts around a model: PEFT, gradient checkpointing, torch.compile.

Every check is independent of RoutingReplay's bookkeeping: the experts used are read at the experts'
inputs (own hooks), and the reference is a copy of the model whose routers are *forced* to the same
experts by a hand-written forward (the family's gate formula written out here), with no RoutingReplay.
Logits and the gradients of every trainable parameter must equal the reference's.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from routereplay.replay import RoutingReplay
from tests.test_replay import build, enable_checkpointing, random_routing, token_ids

FAMILIES = ["qwen3_moe", "glm4_moe", "mixtral"]
_EXPERTS = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?mlp\.experts$")
_ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _forced_router_forward(router: nn.Module, family: str, ids: torch.Tensor):
    """The router's forward, written out per family, with the selection replaced by ``ids [N, K]``."""

    def forward(hidden_states: torch.Tensor):
        weight = router.weight  # read at call time: PEFT parametrises it (LoRA on the router) during forward
        x = hidden_states.reshape(-1, weight.shape[-1])
        if family == "glm4_moe":
            logits = F.linear(x.float(), weight.float())
            chosen = logits.sigmoid().gather(1, ids)
            gates = chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
        elif family == "mixtral":
            logits = F.linear(x, weight)
            chosen = torch.softmax(logits.float(), dim=-1).gather(1, ids)
            gates = chosen / chosen.sum(-1, keepdim=True)
        else:
            logits = F.linear(x, weight)
            chosen = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, ids)
            gates = (chosen / chosen.sum(-1, keepdim=True)).to(logits.dtype)
        return logits, gates, ids

    return forward


def router_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(model layer, router) for every router module, found by name (every copy, below any wrapper)."""
    out = []
    for name, module in model.named_modules():
        last = name.rpartition(".")[2]
        is_router = (
            hasattr(module, "top_k") and hasattr(module, "num_experts") and hasattr(module, "weight")
            and not {"original_module", "base_layer"} & set(module._modules)  # not a PEFT wrapper
        )
        if is_router and (last in ("gate", "base_layer", "original_module") or ".modules_to_save." in name):
            out.append((int(_ROUTER.search(name).group(1)), module))
    return out


def force_experts(reference: nn.Module, family: str, routing: torch.Tensor, moe_layer_ids: list[int]) -> None:
    """Patch every router of ``reference`` (no RoutingReplay involved) to use ``routing [B, T, L, K]``."""
    for layer_id, router in router_modules(reference):
        index = moe_layer_ids.index(layer_id)
        ids = routing[:, :, index].reshape(-1, routing.shape[-1]).long()
        router.forward = _forced_router_forward(router, family, ids)


@contextmanager
def used_experts(model: nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Expert ids each MoE layer's experts module receives, per model layer, in call order."""
    calls: dict[int, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        match = _EXPERTS.search(name)
        if match is None:
            continue
        layer_id = int(match.group(1))
        calls[layer_id] = []

        def hook(_: nn.Module, args: tuple, layer_id: int = layer_id) -> None:
            calls[layer_id].append(args[1].detach().clone())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def assert_used(calls: dict[int, list[torch.Tensor]], routing: torch.Tensor, moe_layer_ids: list[int],
                count: int) -> None:
    assert sorted(calls) == moe_layer_ids
    for index, layer_id in enumerate(moe_layer_ids):
        want = routing[:, :, index].reshape(-1, routing.shape[-1]).long()
        assert len(calls[layer_id]) == count, (layer_id, len(calls[layer_id]))
        for got in calls[layer_id]:
            assert torch.equal(got, want)


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            grads[name] = param.grad.clone()
    return grads


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().pow(2).mean()


# ------------------------------------------------------------------------------------------ PEFT

PEFT_CONFIGS = {
    "lora_attention": dict(target_modules=["q_proj", "v_proj"]),
    "lora_experts": dict(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    "lora_router": dict(target_modules=[], target_parameters=["mlp.gate.weight"]),
    "modules_to_save_gate": dict(target_modules=["q_proj"], modules_to_save=["gate"]),
}


def _peft() -> object:
    return pytest.importorskip("peft")  # per test, so the other tests here run without peft


def _peft_model(family: str, kind: str) -> nn.Module:
    peft = _peft()
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **PEFT_CONFIGS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(family).train(), config)


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_replays_the_active_router(family: str, kind: str) -> None:
    model = _peft_model(family, kind)
    reference = copy.deepcopy(model)
    rr = RoutingReplay(model)
    if kind == "modules_to_save_gate":  # both copies found, the trainable one is the primary
        assert all(len(names) == 2 for names in rr.router_names)
        assert all(any(p.requires_grad for p in router.parameters()) for router in rr._routers)
    if kind == "lora_router":
        assert all(names[0].endswith("mlp.gate.base_layer") for names in rr.router_names)
    ids, routing = token_ids(2, 5), random_routing(rr, 2, 5)
    with used_experts(model) as calls, rr.replay(routing) as report:
        logits = model(input_ids=ids).logits
    loss_of(logits).backward()
    assert_used(calls, routing, rr.moe_layer_ids, count=1)
    assert report.layers_replayed == len(rr.moe_layer_ids) and report.forwards == 1

    force_experts(reference, family, routing, rr.moe_layer_ids)
    want = reference(input_ids=ids).logits
    loss_of(want).backward()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    assert_same_grads(trainable_grads(model), trainable_grads(reference))


def test_peft_modules_to_save_built_before_wrapping_still_replays_the_trainable_copy() -> None:
    """Was silent: RoutingReplay built on the plain model, then get_peft_model copies the router."""
    peft = _peft()
    model = build("qwen3_moe").train()
    rr = RoutingReplay(model)
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["gate"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config)
    ids, routing = token_ids(2, 5), random_routing(rr, 2, 5)
    with used_experts(wrapped) as calls, rr.replay(routing):
        logits = wrapped(input_ids=ids).logits
    assert_used(calls, routing, rr.moe_layer_ids, count=1)
    loss_of(logits).backward()
    copies = [m for _, m in router_modules(wrapped) if any(p.requires_grad for p in m.parameters())]
    assert len(copies) == 2 and all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in copies)


def test_router_replaced_after_building_is_refused() -> None:
    """A router RoutingReplay never saw (replaced after it was built) makes the forward fail, not pass."""
    model = build("qwen3_moe").train()
    rr = RoutingReplay(model)
    old = model.model.layers[3].mlp.gate
    fresh = type(old)(model.config)
    fresh.load_state_dict(old.state_dict())
    model.model.layers[3].mlp.gate = fresh
    with pytest.raises(RuntimeError, match=r"did not reach the routers of model layers \[3\].*after RoutingReplay"):
        with rr.replay(random_routing(rr, 2, 5)):
            model(token_ids(2, 5))


# ------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_backward_after_the_context_replays(family: str, use_reentrant: bool) -> None:
    """Was silent with reentrant checkpointing: the recompute routed natively and gradients were wrong."""
    model = build(family).train()
    reference = copy.deepcopy(model)
    rr = RoutingReplay(model)
    enable_checkpointing(model, use_reentrant)
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    ids, routing = token_ids(2, 6), random_routing(rr, 2, 6)
    with used_experts(model) as calls:
        with rr.replay(routing) as report:
            logits = model(ids, use_cache=False).logits
        assert report.recomputed_layers == 0
        # Another context open (the next micro-batch) while this backward recomputes: still this routing.
        other = random_routing(rr, 1, 3, seed=9)
        with rr.replay(other):
            model(token_ids(1, 3), use_cache=False)
            loss_of(logits).backward()
    for index, layer_id in enumerate(rr.moe_layer_ids):
        want = routing[:, :, index].reshape(-1, 2)
        # forward, then (in the second context) the other forward, then this forward's recompute
        assert [c.shape[0] for c in calls[layer_id]] == [12, 3, 12]
        assert torch.equal(calls[layer_id][0], want) and torch.equal(calls[layer_id][2], want)
    assert report.recomputed_layers == len(rr.moe_layer_ids)

    force_experts(reference, family, routing, rr.moe_layer_ids)
    want_logits = reference(ids, use_cache=False).logits
    loss_of(want_logits).backward()
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert_same_grads(trainable_grads(model), trainable_grads(reference))


def test_checkpoint_wrapper_on_decoder_layers_replays_in_recompute() -> None:
    """torch's checkpoint_wrapper (what FSDP/accelerate apply) checkpoints the whole decoder layer call."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = build("qwen3_moe").train()
    reference = copy.deepcopy(model)
    layer_class = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_class))
    rr = RoutingReplay(model)
    assert all("_checkpoint_wrapped_module" in names[0] for names in rr.router_names)
    ids, routing = token_ids(2, 6), random_routing(rr, 2, 6)
    with used_experts(model) as calls:
        with rr.replay(routing):
            logits = model(ids, use_cache=False).logits
        loss_of(logits).backward()
    assert_used(calls, routing, rr.moe_layer_ids, count=2)
    force_experts(reference, "qwen3_moe", routing, rr.moe_layer_ids)
    want = reference(ids, use_cache=False).logits
    loss_of(want).backward()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    got = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in trainable_grads(model).items()}
    assert_same_grads(got, trainable_grads(reference))


# ------------------------------------------------------------------------------ torch.compile


def _counting_backend(graphs: list) -> object:
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def test_torch_compile_fullgraph_replays_with_as_many_graphs_as_native() -> None:
    family = "qwen3_moe"
    batches = [(token_ids(2, 6, seed=s), s) for s in (1, 2)]

    torch.compiler.reset()
    native_graphs: list = []
    native = torch.compile(build(family).train(), backend=_counting_backend(native_graphs), fullgraph=True)
    for ids, _ in batches:
        loss_of(native(ids, use_cache=False).logits).backward()

    torch.compiler.reset()
    replay_graphs: list = []
    model = build(family).train()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=_counting_backend(replay_graphs), fullgraph=True)
    rr = RoutingReplay(compiled)  # found through OptimizedModule's _orig_mod
    assert rr.router_names[0][0].startswith("_orig_mod.")
    for ids, seed in batches:
        routing = random_routing(rr, 2, 6, seed=seed)
        with rr.replay(routing) as report:
            logits = compiled(ids, use_cache=False).logits
        loss_of(logits).backward()
        assert report.layers_replayed == len(rr.moe_layer_ids)
        ref = copy.deepcopy(reference)
        force_experts(ref, family, routing, rr.moe_layer_ids)
        want = ref(ids, use_cache=False).logits
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
        loss_of(want).backward()
        got = {k.removeprefix("_orig_mod."): v for k, v in trainable_grads(compiled).items()}
        assert_same_grads(got, trainable_grads(ref))
        model.zero_grad()
    assert len(replay_graphs) == len(native_graphs) >= 1
    torch.compiler.reset()


def test_torch_compile_with_checkpointing_replays_given_dynamo_side_effects_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under torch.compile a checkpointed region may not have Python side effects, which replay's hooks
    have (handing the step to the router, counting coverage): dynamo refuses it loudly ("Unsupported HOP:
    Unsafe side effect") unless ``skip_fwd_side_effects_in_bwd_under_checkpoint`` is set. With it, the
    recompute runs inside the compiled backward and uses the replayed experts."""
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True)
    torch.compiler.reset()
    model = build("glm4_moe").train()
    reference = copy.deepcopy(model)
    enable_checkpointing(model, use_reentrant=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    rr = RoutingReplay(compiled)
    ids, routing = token_ids(2, 6), random_routing(rr, 2, 6)
    with rr.replay(routing) as report:
        logits = compiled(ids, use_cache=False).logits
    loss_of(logits).backward()  # after the context
    assert report.layers_replayed == len(rr.moe_layer_ids)
    force_experts(reference, "glm4_moe", routing, rr.moe_layer_ids)
    want = reference(ids, use_cache=False).logits
    loss_of(want).backward()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    got = {k.removeprefix("_orig_mod."): v for k, v in trainable_grads(compiled).items()}
    assert_same_grads(got, trainable_grads(reference))
    torch.compiler.reset()
