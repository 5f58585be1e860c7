"""Routing replay (R3) and recording (R2) for Hugging Face transformers MoE models.

Each supported family has a router module whose forward returns
``(router_logits, topk_weights, topk_indices)`` for hidden states flattened to ``[B*T, H]``
(transformers >= 5.17). While a ``replay`` or ``record`` context is open, every router's forward
is replaced on the instance by a wrapper that runs the native router (so the dense logits are
computed exactly as the model computes them, gradients included) and then either keeps the
native selection (record) or swaps in the replayed expert ids and recomputes the gate weights
from the dense scores with the family's own normalisation and scaling (replay). The original
forward is restored when the context exits.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from routereplay.replay.align import RoutingLike, as_integer_tensor, find_invalid_row

GateWeights = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]
"""(router, dense logits [N, E], expert ids [N, K], hidden dtype) -> gate weights [N, K]."""


def _softmax_gates(
    router: nn.Module, logits: torch.Tensor, ids: torch.Tensor, _: torch.dtype
) -> torch.Tensor:
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all experts, optionally renormalised over the chosen."""
    gates = F.softmax(logits, dim=-1, dtype=torch.float).gather(1, ids)
    if router.norm_topk_prob:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates.to(logits.dtype)


def _mixtral_gates(_: nn.Module, logits: torch.Tensor, ids: torch.Tensor, __: torch.dtype) -> torch.Tensor:
    """Mixtral: softmax over all experts, always renormalised over the chosen, kept in fp32."""
    gates = F.softmax(logits.float(), dim=-1).gather(1, ids)
    return gates / gates.sum(dim=-1, keepdim=True)


def _ernie_gates(
    router: nn.Module, logits: torch.Tensor, ids: torch.Tensor, hidden_dtype: torch.dtype
) -> torch.Tensor:
    """ERNIE-4.5-MoE: fp32 softmax, renormalised with the sum clamped to ``moe_norm_min``.

    The correction bias (``moe_statics``) only affects which experts are selected, so it has no
    part here.
    """
    gates = F.softmax(logits.float(), dim=1, dtype=torch.float).gather(1, ids)
    gates = gates / torch.clamp(gates.sum(dim=-1, keepdim=True), min=router.norm_min)
    return gates.to(hidden_dtype)


def _grouped_sigmoid_gates(
    router: nn.Module, logits: torch.Tensor, ids: torch.Tensor, _: torch.dtype
) -> torch.Tensor:
    """GLM-4-MoE, DeepSeek-V3: sigmoid scores, optional renormalisation, routed_scaling_factor.

    Group-limited selection and ``e_score_correction_bias`` only decide the native choice; the
    replayed ids replace that choice, and the weights use the unbiased sigmoid scores.
    """
    gates = logits.sigmoid().gather(1, ids)
    if router.norm_topk_prob:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    return gates * router.routed_scaling_factor


def _gpt_oss_gates(_: nn.Module, logits: torch.Tensor, ids: torch.Tensor, __: torch.dtype) -> torch.Tensor:
    """GPT-OSS: softmax over the chosen experts' logits only (router bias included in the logits)."""
    return F.softmax(logits.gather(1, ids), dim=1, dtype=logits.dtype)


@dataclass(frozen=True)
class _Family:
    name: str
    router_class: str
    gate_weights: GateWeights


_FAMILIES = (
    _Family("qwen3_moe", "Qwen3MoeTopKRouter", _softmax_gates),
    _Family("qwen2_moe", "Qwen2MoeTopKRouter", _softmax_gates),
    _Family("olmoe", "OlmoeTopKRouter", _softmax_gates),
    _Family("mixtral", "MixtralTopKRouter", _mixtral_gates),
    _Family("ernie4_5_moe", "Ernie4_5_MoeTopKRouter", _ernie_gates),
    _Family("glm4_moe", "Glm4MoeTopkRouter", _grouped_sigmoid_gates),
    _Family("deepseek_v3", "DeepseekV3TopkRouter", _grouped_sigmoid_gates),
    _Family("gpt_oss", "GptOssTopKRouter", _gpt_oss_gates),
)
_FAMILY_BY_ROUTER_CLASS = {family.router_class: family for family in _FAMILIES}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(family.name for family in _FAMILIES)
"""transformers ``model_type`` values whose routers RoutingReplay can patch."""

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass, i.e. when a checkpointed layer is recomputed.

    torch has no public flag for this; the engine's thread-local graph task id is -1 outside backward.
    """
    return torch._C._current_graph_task_id() != -1


class RoutingRecord:
    """Native routing captured by ``RoutingReplay.record()``, one entry per forward pass.

    Recomputations of checkpointed layers during backward are not recorded again.
    """

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self._forwards: list[list[torch.Tensor | None]] = []

    def _add(self, layer: int, ids: torch.Tensor) -> None:
        if not self._forwards or self._forwards[-1][layer] is not None:
            self._forwards.append([None] * self._num_layers)
        self._forwards[-1][layer] = ids

    @property
    def routings(self) -> list[torch.Tensor]:
        """Routing of each recorded forward, ``[B, T, L, K]`` int64 on the routers' device."""
        stacked = []
        for index, layers in enumerate(self._forwards):
            missing = [layer for layer, ids in enumerate(layers) if ids is None]
            if missing:
                raise ValueError(f"forward {index} did not reach MoE layers {missing}")
            stacked.append(torch.stack(layers, dim=2))  # type: ignore[arg-type]
        return stacked

    @property
    def routing(self) -> torch.Tensor:
        """Routing of the single recorded forward, ``[B, T, L, K]`` int64 (see ``routings`` for several)."""
        routings = self.routings
        if len(routings) != 1:
            raise ValueError(f"{len(routings)} forwards were recorded; use .routings")
        return routings[0]


class _Replay:
    """State of one ``RoutingReplay.replay()`` context: the validated routing, on the routers' device."""

    def __init__(
        self,
        replay: RoutingReplay,
        routing: RoutingLike,
        mask: RoutingLike | None,
        device: torch.device,
    ) -> None:
        ids = as_integer_tensor(routing, "routing")
        layers, k = len(replay.moe_layer_ids), replay.top_k
        if ids.dim() != 4:
            raise ValueError(f"routing must be [B, T, L, K], got shape {tuple(ids.shape)}")
        batch, seq = ids.shape[:2]
        if ids.shape[2] != layers:
            raise ValueError(f"routing has {ids.shape[2]} MoE layers, the model has {layers}")
        if ids.shape[3] != k:
            raise ValueError(f"routing has K={ids.shape[3]} experts per row, the model uses top-{k}")
        ids = ids.to(device, non_blocking=True)
        mask_on_device = None
        if mask is not None:
            mask_tensor = torch.as_tensor(mask)
            if tuple(mask_tensor.shape) != (batch, seq):
                raise ValueError(
                    f"mask shape {tuple(mask_tensor.shape)} does not match routing [B, T] = {(batch, seq)}"
                )
            if mask_tensor.is_floating_point():
                raise ValueError(f"mask dtype {mask_tensor.dtype} must be bool")
            mask_on_device = mask_tensor.to(device=device, dtype=torch.bool)
        invalid = find_invalid_row(ids, mask_on_device, replay.num_experts)
        if invalid is not None:
            b, t, layer, reason = invalid
            raise ValueError(f"sample {b}, position {t}, MoE layer {layer}: {reason}")
        self.batch_shape = (batch, seq)
        # One copy in the compact dtype, laid out so that each layer's ids are a contiguous [B*T, K].
        self.ids_by_layer = ids.permute(2, 0, 1, 3).reshape(layers, batch * seq, k).contiguous()
        self.flat_mask = None if mask_on_device is None else mask_on_device.reshape(-1, 1)
        self.checkpointed_forwards = 0
        self.recomputed_forwards = 0


class RoutingReplay:
    """Replays (R3) or records (R2) the expert choice of every router of a transformers MoE model.

    ``moe_layer_ids[l]`` is the model layer index of MoE layer l (axis 2 of a batch routing).
    Only one ``replay``/``record`` context may be open at a time.
    """

    def __init__(self, model: nn.Module) -> None:
        found = [
            (name, module, _FAMILY_BY_ROUTER_CLASS[type(module).__name__])
            for name, module in model.named_modules()
            if type(module).__name__ in _FAMILY_BY_ROUTER_CLASS
        ]
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if not found:
            raise ValueError(
                f"{type(model).__name__} (model_type {model_type!r}) is not supported: no router of a "
                f"supported family ({', '.join(SUPPORTED_FAMILIES)}) was found"
            )
        families = {family.name for _, _, family in found}
        if len(families) > 1:
            raise ValueError(f"model mixes router families {sorted(families)}")
        self.family: str = found[0][2].name
        self._gate_weights = found[0][2].gate_weights
        self._routers: list[nn.Module] = []
        self._decoder_layers: list[nn.Module] = []
        self._blocks: list[nn.Module] = []
        self.moe_layer_ids: list[int] = []
        for name, router, _ in found:
            match = _LAYER_INDEX.search(name)
            if match is None:
                raise ValueError(f"cannot tell the decoder layer of router {name!r}")
            self.moe_layer_ids.append(int(match.group(1)))
            self._routers.append(router)
            self._decoder_layers.append(model.get_submodule(name[: match.end() - 1]))
            self._blocks.append(model.get_submodule(name.rpartition(".")[0]))
        if self.moe_layer_ids != sorted(set(self.moe_layer_ids)):
            raise ValueError(f"routers are not in increasing layer order: {self.moe_layer_ids}")
        num_experts = {int(router.num_experts) for router in self._routers}
        top_k = {int(router.top_k) for router in self._routers}
        if len(num_experts) != 1 or len(top_k) != 1:
            raise ValueError(f"routers differ in number of experts {num_experts} or top-k {top_k}")
        self.num_experts: int = num_experts.pop()
        self.top_k: int = top_k.pop()
        self._batch_shapes: list[tuple[int, int]] = [(0, 0)] * len(self._routers)
        self._active = False

    @contextmanager
    def replay(self, routing: RoutingLike, mask: RoutingLike | None = None) -> Iterator[None]:
        """Force every router to choose the experts in ``routing [B, T, L, K]``.

        Gate weights are the router's own dense scores gathered at the replayed ids, then
        normalised and scaled as the family does natively, so the router weight still receives
        gradients. Tokens with ``mask [B, T] == False`` route natively. With gradient checkpointing,
        run backward inside the context so the recomputed layers replay the same experts.
        Raises ValueError (naming sample, position and MoE layer) for routing that does not fit.
        """
        state = _Replay(self, routing, mask, self._routers[0].weight.device)
        with self._patched(lambda layer, out, dtype: self._route_replayed(state, layer, out, dtype)):
            yield
        if state.checkpointed_forwards and not state.recomputed_forwards:
            warnings.warn(
                "gradient checkpointing is on but backward did not run inside rr.replay(): the "
                "recomputed layers will route natively, not with the replayed experts",
                stacklevel=3,
            )

    @contextmanager
    def record(self) -> Iterator[RoutingRecord]:
        """Record the native routing of the forwards run inside the context (R2's old-policy pass)."""
        record = RoutingRecord(len(self._routers))
        with self._patched(lambda layer, out, dtype: self._route_recorded(record, layer, out)):
            yield record

    def _route_replayed(
        self, state: _Replay, layer: int, router_out: tuple[torch.Tensor, ...], hidden_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, _, native_ids = router_out
        batch_shape = self._batch_shapes[layer]
        if batch_shape != state.batch_shape:
            raise ValueError(self._shape_mismatch(state.batch_shape, batch_shape, layer))
        decoder_layer = self._decoder_layers[layer]
        if _in_backward():
            state.recomputed_forwards += 1
        elif (
            torch.is_grad_enabled()
            and decoder_layer.training
            and getattr(decoder_layer, "gradient_checkpointing", False)
        ):
            state.checkpointed_forwards += 1
        ids = state.ids_by_layer[layer].to(device=native_ids.device, dtype=torch.long, non_blocking=True)
        if state.flat_mask is not None:
            ids = torch.where(state.flat_mask.to(native_ids.device), ids, native_ids)
        return logits, self._gate_weights(self._routers[layer], logits, ids, hidden_dtype), ids

    def _route_recorded(
        self, record: RoutingRecord, layer: int, router_out: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        if not _in_backward():
            batch, seq = self._batch_shapes[layer]
            record._add(layer, router_out[2].detach().reshape(batch, seq, -1).to(torch.long))
        return router_out

    @staticmethod
    def _shape_mismatch(routing_shape: tuple[int, int], batch_shape: tuple[int, int], layer: int) -> str:
        (routing_batch, routing_seq), (batch, seq) = routing_shape, batch_shape
        if routing_batch < batch:
            return (
                f"sample {routing_batch}, position 0, MoE layer {layer}: routing is shorter than the batch "
                f"({routing_batch} samples for a batch of {batch})"
            )
        if routing_seq < seq:
            return (
                f"sample 0, position {routing_seq}, MoE layer {layer}: routing is shorter than the batch "
                f"({routing_seq} positions for a batch of length {seq})"
            )
        return f"MoE layer {layer}: routing covers [B, T] = {routing_shape} but the batch is {batch_shape}"

    @contextmanager
    def _patched(self, route: Callable[[int, tuple[torch.Tensor, ...], torch.dtype], Any]) -> Iterator[None]:
        """Swap each router's forward for ``route`` applied to its native output; restore on exit."""
        if self._active:
            raise RuntimeError("RoutingReplay contexts do not nest")
        self._active = True
        saved_forwards = [router.__dict__.get("forward") for router in self._routers]
        hooks = []
        try:
            for layer, (router, block) in enumerate(zip(self._routers, self._blocks, strict=True)):
                router.forward = self._wrap(layer, router.forward, route)
                hooks.append(block.register_forward_pre_hook(self._shape_hook(layer), with_kwargs=True))
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for router, saved in zip(self._routers, saved_forwards, strict=True):
                if saved is None:
                    router.__dict__.pop("forward", None)
                else:
                    router.forward = saved
            self._active = False

    def _shape_hook(self, layer: int) -> Callable[..., None]:
        """Remember (B, T) of the MoE block's input: the router only sees the flattened [B*T, H]."""

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            if hidden_states.dim() != 3:
                raise RuntimeError(f"MoE block input must be [B, T, H], got {tuple(hidden_states.shape)}")
            self._batch_shapes[layer] = (hidden_states.shape[0], hidden_states.shape[1])

        return hook

    @staticmethod
    def _wrap(
        layer: int,
        native_forward: Callable[..., Any],
        route: Callable[[int, tuple[torch.Tensor, ...], torch.dtype], Any],
    ) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            router_out = native_forward(hidden_states, *args, **kwargs)
            if not (isinstance(router_out, tuple) and len(router_out) == 3):
                raise RuntimeError(
                    "router returned something other than (router_logits, topk_weights, topk_indices); "
                    "this transformers version is not supported (need >= 5.17)"
                )
            return route(layer, router_out, hidden_states.dtype)

        return forward
