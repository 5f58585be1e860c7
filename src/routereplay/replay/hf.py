"""Routing replay (R3) and recording (R2) for Hugging Face transformers MoE models.

Each supported family has a router module whose forward returns
``(router_logits, topk_weights, topk_indices)`` for hidden states flattened to ``[B*T, H]``
(transformers >= 5.17). ``RoutingReplay(model)`` finds the routers (through DDP, FSDP2,
``torch.compile``, PEFT and checkpoint wrappers, see ``discover``) and installs hooks that stay until
``close()``:

- a forward pre-hook on the decoder stack's module (the parent of ``layers``) starts a *step* for each
  forward and passes it to every decoder layer as the keyword argument ``routereplay_step``;
- pre-hooks inside each decoder layer take the step out of the keyword arguments (before attention
  sees them) and hand it to that layer's router;
- a forward hook on each router lets the native router run (so the dense logits, gradients included,
  are computed exactly as the model computes them), then keeps its selection (record, native) or
  replaces it by the replayed ids, recomputing the gate weights from the dense scores with the
  family's own normalisation and scaling (replay).

**How the routing survives until backward.** The step is an argument of the decoder layer's call, and
gradient checkpointing (transformers' own, reentrant or not, ``checkpoint_wrapper``, DeepSpeed) saves
a layer's arguments to re-run it in backward. A recompute therefore receives the very step of the
forward it recomputes, with that forward's routing, whenever backward runs: inside the context,
after it exited, or while another context is open. A router called a second time for the same step
is a recompute: it replays (or, recording, is not recorded again). No global "in backward" flag is
read. Checkpointing must be at the decoder layer or below the decoder stack (every wrapper above
checkpoints layers); a checkpoint around the whole model re-runs the stack's hook and is not
supported.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from routereplay.replay.align import RoutingLike, as_integer_tensor, find_invalid_row
from routereplay.replay.discover import FoundRouters, find_routers
from routereplay.replay.families import SUPPORTED_FAMILIES
from routereplay.replay.report import ReplayReport

__all__ = ["SUPPORTED_FAMILIES", "ReplayReport", "RoutingRecord", "RoutingReplay", "STEP_KWARG"]

STEP_KWARG = "routereplay_step"
"""Keyword argument that carries a forward's step from the decoder stack to its decoder layers."""

_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[RoutingReplay]] = weakref.WeakKeyDictionary()
"""Decoder stack -> the RoutingReplay whose hooks it carries (not a module attribute: deepcopy would copy it)."""
_HOOK_MARK = "_routereplay_hook_of"
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_HOOK_ID_SETS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _remove_foreign_hooks(model: nn.Module, owner: object) -> None:
    """Drop hooks another RoutingReplay left on ``model``'s modules: copied by ``copy.deepcopy`` (a
    reference model copied after RoutingReplay was built), or left by an instance built earlier."""
    for module in model.modules():
        for dict_name in _HOOK_DICTS:
            hooks = module.__dict__.get(dict_name, {})
            for key in [key for key, fn in hooks.items() if getattr(fn, _HOOK_MARK, owner) is not owner]:
                del hooks[key]
                for set_name in _HOOK_ID_SETS:
                    module.__dict__.get(set_name, {}).pop(key, None)


class RoutingRecord:
    """Native routing captured by ``RoutingReplay.record()``, one entry per forward pass.

    Recomputations of checkpointed layers during backward are not recorded again.
    """

    def __init__(self, session: _Session) -> None:
        self._session = session

    @property
    def routings(self) -> list[torch.Tensor]:
        """Routing of each recorded forward, ``[B, T, L, K]`` int64 on the routers' device."""
        stacked = []
        for index, step in enumerate(self._session.steps):
            missing = [layer for layer, ids in enumerate(step.recorded) if ids is None]
            if missing:
                raise ValueError(f"forward {index} did not reach MoE layers {missing}")
            if step.batch_shape is None:
                raise ValueError(f"forward {index}: cannot tell its [B, T] (no input_ids or inputs_embeds)")
            batch, seq = step.batch_shape
            layers = [ids.reshape(batch, seq, -1) for ids in step.recorded]  # type: ignore[union-attr]
            stacked.append(torch.stack(layers, dim=2))
        return stacked

    @property
    def routing(self) -> torch.Tensor:
        """Routing of the single recorded forward, ``[B, T, L, K]`` int64 (see ``routings`` for several)."""
        routings = self.routings
        if len(routings) != 1:
            raise ValueError(f"{len(routings)} forwards were recorded; use .routings")
        return routings[0]


class _Session:
    """One ``replay()`` / ``record()`` context: the validated routing and the steps run under it."""

    def __init__(
        self,
        rr: RoutingReplay,
        mode: Literal["replay", "record"],
        routing: RoutingLike | None = None,
        mask: RoutingLike | None = None,
        strict: bool = True,
        keep_aux: bool = False,
    ) -> None:
        self.mode = mode
        self.strict = strict
        self.keep_aux = keep_aux
        self.num_layers = len(rr.moe_layer_ids)
        self.num_experts = rr.num_experts
        self.moe_layer_ids = rr.moe_layer_ids
        self.gate_weights = rr._gate_weights
        # Steps form a linked list from a sentinel: appending reads only the tail (a _Step however many
        # forwards ran) and writes two attributes, so torch.compile does not recompile per forward (a
        # list would be guarded on its length).
        self._head = _Step(None, self.num_layers, None)
        self._tail = self._head
        self.where = ""
        self.routing: torch.Tensor | None = None
        self.flat_mask: torch.Tensor | None = None
        self.tokens = self.tokens_replayed = 0
        if mode == "replay":
            assert routing is not None
            self._validate(rr, routing, mask)

    def _validate(self, rr: RoutingReplay, routing: RoutingLike, mask: RoutingLike | None) -> None:
        ids = as_integer_tensor(routing, "routing")
        layers, k = len(rr.moe_layer_ids), rr.top_k
        if ids.dim() != 4:
            raise ValueError(f"routing must be [B, T, L, K], got shape {tuple(ids.shape)}")
        batch, seq = ids.shape[:2]
        if ids.shape[2] != layers:
            raise ValueError(f"routing has {ids.shape[2]} MoE layers, the model has {layers}")
        if ids.shape[3] != k:
            raise ValueError(f"routing has K={ids.shape[3]} experts per row, the model uses top-{k}")
        device = rr._device()
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
        invalid = find_invalid_row(ids, mask_on_device, rr.num_experts)
        if invalid is not None:
            b, t, layer, reason = invalid
            raise ValueError(f"sample {b}, position {t}, MoE layer {layer}: {reason}")
        # [B, T, L, K] kept as given (compact dtype); each layer's ids are read as a [B*T, K] view.
        self.routing = ids
        self.flat_mask = None if mask_on_device is None else mask_on_device.reshape(-1, 1)
        self.tokens = batch * seq
        self.tokens_replayed = self.tokens if mask_on_device is None else int(mask_on_device.sum())

    @property
    def steps(self) -> list[_Step]:
        steps, step = [], self._head.next
        while step is not None:
            steps.append(step)
            step = step.next
        return steps

    def add_step(self, step: _Step) -> None:
        self._tail.next = step
        self._tail = step

    def check_batch(self, batch_shape: tuple[int, int] | None) -> None:
        """Refuse a forward whose batch is not the routing's ``[B, T]`` (replay)."""
        if self.routing is None or batch_shape is None:
            return
        routing_shape = (self.routing.shape[0], self.routing.shape[1])
        if batch_shape != routing_shape:
            raise ValueError(_shape_mismatch(routing_shape, batch_shape))

    def finish_step(self, step: _Step) -> None:
        """After a forward: every MoE layer must have been reached (replay)."""
        if self.mode != "replay":
            return
        missing = [self.moe_layer_ids[i] for i, calls in enumerate(step.calls) if not calls]
        if missing:
            self.problem(
                f"a forward under rr.replay() did not reach the routers of model layers {missing} "
                f"(MoE layers {self.moe_layer_ids}); those layers routed natively. Was the model wrapped or "
                "its routers replaced after RoutingReplay was built? Build RoutingReplay on the model as it "
                "is trained (after get_peft_model / fully_shard / torch.compile)"
            )

    def problem(self, message: str) -> None:
        if self.strict:
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=4)


class _Step:
    """One forward of the model. Travels as the ``routereplay_step`` keyword argument of every decoder
    layer, so a checkpointed layer's recompute finds the routing of the forward it recomputes."""

    def __init__(self, session: _Session | None, num_layers: int, batch_shape: tuple[int, int] | None) -> None:
        self.session = session
        self.batch_shape = batch_shape
        self.calls = [0] * num_layers  # router calls per MoE layer: 1 = the forward, more = recomputes
        self.recorded: list[torch.Tensor | None] = [None] * num_layers
        self.aux: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.next: _Step | None = None


def _shape_mismatch(routing_shape: tuple[int, int], batch_shape: tuple[int, int]) -> str:
    (routing_batch, routing_seq), (batch, seq) = routing_shape, batch_shape
    if routing_batch < batch:
        return (
            f"sample {routing_batch}, position 0, MoE layer 0: routing is shorter than the batch "
            f"({routing_batch} samples for a batch of {batch})"
        )
    if routing_seq < seq:
        return (
            f"sample 0, position {routing_seq}, MoE layer 0: routing is shorter than the batch "
            f"({routing_seq} positions for a batch of length {seq})"
        )
    return f"routing covers [B, T] = {routing_shape} but the batch is {batch_shape}"


def _takes_keywords(module: nn.Module) -> bool:
    """Whether the module's forward accepts ``**kwargs`` (so the step could be passed on to it)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _caller() -> str:
    """file:line of the code that entered the context (the first frame outside this module and contextlib)."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename in (__file__, contextlib.__file__):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _batch_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """(B, T) of a decoder stack's forward, from input_ids [B, T] or inputs_embeds [B, T, H]."""
    first = args[0] if args else kwargs.get("input_ids")
    if first is None:
        first = kwargs.get("inputs_embeds")
    if isinstance(first, torch.Tensor) and first.dim() >= 2:
        return (first.shape[0], first.shape[1])
    return None


class RoutingReplay:
    """Replays (R3) or records (R2) the expert choice of every router of a transformers MoE model.

    ``model`` may be wrapped (DDP, FSDP2, ``torch.compile``, PEFT); build it on the model as it is
    trained. ``moe_layer_ids[l]`` is the model layer index of MoE layer l (axis 2 of a batch routing).
    Only one ``replay``/``record`` context may be open at a time. The hooks stay installed until
    ``close()`` (outside a context they leave routing native); building a second RoutingReplay on the
    same model closes the first.
    """

    def __init__(self, model: nn.Module) -> None:
        found = find_routers(model)
        self.family: str = found.family.name
        self._gate_weights = found.family.gate_weights
        self._found = found
        self.moe_layer_ids: list[int] = [layer.layer_id for layer in found.layers]
        self._routers: list[nn.Module] = [layer.primary for layer in found.layers]
        self.router_names: list[list[str]] = [list(layer.router_names) for layer in found.layers]
        """Module path of each MoE layer's router, with every copy (PEFT ``modules_to_save``)."""
        self.num_experts: int = int(self._routers[0].num_experts)
        self.top_k: int = int(self._routers[0].top_k)
        self._session: _Session | None = None
        self._stash: list[_Step | None] = [None] * len(found.layers)
        self._handles: list[RemovableHandle] = []
        self._closed = False
        self._base = model.get_submodule(found.base_name)
        owner = _OWNERS.get(self._base)
        previous = None if owner is None else owner()
        if previous is not None:
            if previous._session is not None:
                raise RuntimeError(
                    f"this model already has a RoutingReplay with an open context (entered at "
                    f"{previous._session.where}); exit it before building another"
                )
            previous.close()
        self._install(model, found)
        _OWNERS[self._base] = weakref.ref(self)

    # ----------------------------------------------------------------------------------- public API

    @contextmanager
    def replay(
        self,
        routing: RoutingLike,
        mask: RoutingLike | None = None,
        *,
        strict: bool = True,
        aux_loss: Literal["native", "replayed"] = "native",
    ) -> Iterator[ReplayReport]:
        """Force every router to choose the experts in ``routing [B, T, L, K]``; yields a ReplayReport.

        Gate weights are the router's own dense scores gathered at the replayed ids, then
        normalised and scaled as the family does natively, so the router weight still receives
        gradients. Tokens with ``mask [B, T] == False`` route natively. Every forward inside the
        context must have the routing's ``[B, T]``; gradient-checkpointed layers recompute with the
        replayed experts however late backward runs.

        Raises ValueError (naming sample, position and MoE layer) for routing that does not fit, and
        RuntimeError when a forward does not reach every MoE layer's router, a router is called outside
        the model's forward, no forward runs inside the context, or another context is still open;
        with ``strict=False`` the RuntimeErrors become warnings.

        ``aux_loss``: the model's own ``aux_loss`` (``output_router_logits=True``) is always computed by
        transformers from a top-k of the router's scores, i.e. the native choice (as Megatron and verl
        do: the balancing term then keeps pushing the *router's* preference towards balance, which is
        what the router learns). ``"replayed"`` keeps each forward's logits and replayed ids so that
        ``report.load_balancing_loss(attention_mask)`` gives the same loss counted on the experts that
        were actually used.
        """
        if aux_loss not in ("native", "replayed"):
            raise ValueError(f"aux_loss must be 'native' or 'replayed', got {aux_loss!r}")
        session = _Session(self, "replay", routing, mask, strict=strict, keep_aux=aux_loss == "replayed")
        report = ReplayReport(session)
        with self._open(session):
            yield report
        if session._head.next is None:
            session.problem(
                "no forward of the model ran inside rr.replay(): the routing was never used (is the model "
                "called the one RoutingReplay was built on?)"
            )

    @contextmanager
    def record(self) -> Iterator[RoutingRecord]:
        """Record the native routing of the forwards run inside the context (R2's old-policy pass)."""
        session = _Session(self, "record")
        with self._open(session):
            yield RoutingRecord(session)

    def close(self) -> None:
        """Remove every hook; the model routes natively from now on, recomputes included."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        owner = _OWNERS.get(self._base)
        if owner is not None and owner() is self:
            del _OWNERS[self._base]
        self._closed = True

    # ----------------------------------------------------------------------------------- internals

    def _device(self) -> torch.device:
        weight = self._routers[0].weight
        return weight.device

    @contextmanager
    def _open(self, session: _Session) -> Iterator[None]:
        if self._closed:
            raise RuntimeError(
                "this RoutingReplay is closed (by close(), or because another RoutingReplay was built on the same "
                "model): use the newer one"
            )
        if self._session is not None:
            raise RuntimeError(
                f"RoutingReplay contexts do not nest: a {self._session.mode}() context entered at "
                f"{self._session.where} is still open (never exited?); exit it before entering another"
            )
        session.where = _caller()
        self._session = session
        try:
            yield
        finally:
            self._session = None

    def _install(self, model: nn.Module, found: FoundRouters) -> None:
        _remove_foreign_hooks(model, self)
        hooks = self._handles
        hooks.append(self._base.register_forward_pre_hook(self._mark(self._on_stack_start), with_kwargs=True))
        hooks.append(self._base.register_forward_hook(self._mark(self._on_stack_end), with_kwargs=True))
        router_ids = {id(router) for layer in found.layers for router in layer.routers}
        layer_of_decoder = {layer.decoder_name: index for index, layer in enumerate(found.layers)}
        for decoder_name in found.decoder_names:
            decoder = model.get_submodule(decoder_name)
            index = layer_of_decoder.get(decoder_name)
            path: dict[int, nn.Module] = {}
            if index is not None:
                # The modules between the decoder layer and its router(s): the step passes through them.
                path[id(decoder)] = decoder
                for router_name in found.layers[index].router_names:
                    module = decoder
                    for part in router_name[len(decoder_name) + 1 :].split(".")[:-1]:
                        module = module.get_submodule(part)
                        path[id(module)] = module
                for module in path.values():
                    if _takes_keywords(module):
                        peek = self._mark(self._peek_hook(index))
                        hooks.append(module.register_forward_pre_hook(peek, with_kwargs=True))
            # Modules that may receive the decoder layer's keyword arguments (attention): take the step
            # out, so no attention implementation ever sees it. Depth 2 covers checkpoint_wrapper's level.
            for child_name, child in decoder.named_modules():
                depth = child_name.count(".") + 1 if child_name else 0
                if (
                    1 <= depth <= 2
                    and id(child) not in path
                    and id(child) not in router_ids
                    and _takes_keywords(child)
                ):
                    hooks.append(child.register_forward_pre_hook(self._mark(self._take_hook(index)), with_kwargs=True))
        for index, layer in enumerate(found.layers):
            for router in layer.routers:
                hooks.append(router.register_forward_hook(self._mark(self._router_hook(index))))

    def _mark(self, hook: Any) -> Any:
        """Tag a hook as this instance's, so a later RoutingReplay can find hooks copied with a model."""

        def marked(*args: Any, **kwargs: Any) -> Any:
            return hook(*args, **kwargs)

        marked.__dict__[_HOOK_MARK] = self
        return marked

    def _on_stack_start(self, stack: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if stack is not self._base:  # a hook deep-copied with the model: the copy is not ours
            return None
        for index in range(len(self._stash)):
            self._stash[index] = None
        session = self._session
        batch_shape = _batch_shape(args, kwargs)
        if session is not None:
            session.check_batch(batch_shape)
        step = _Step(session, len(self._stash), batch_shape)
        if session is not None:
            session.add_step(step)
        kwargs[STEP_KWARG] = step
        return args, kwargs

    def _on_stack_end(self, stack: nn.Module, __: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if stack is not self._base:
            return
        step = kwargs.get(STEP_KWARG)
        if isinstance(step, _Step) and step.session is not None:
            step.session.finish_step(step)

    def _peek_hook(self, index: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            step = kwargs.get(STEP_KWARG)
            if step is not None:
                self._stash[index] = step

        return hook

    def _take_hook(self, index: int | None) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            step = kwargs.pop(STEP_KWARG, None)
            if step is not None and index is not None:
                self._stash[index] = step

        return hook

    def _router_hook(self, index: int) -> Any:
        def hook(router: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            step = self._stash[index]
            if step is None:
                session = self._session
                if session is not None and session.mode == "replay":
                    session.problem(
                        f"the router of model layer {self.moe_layer_ids[index]} ran under rr.replay() outside "
                        "a forward of the model's decoder stack, so it was not replayed: a submodule called "
                        "directly, or a copy of the model made after RoutingReplay was built (build a "
                        "RoutingReplay for the copy and replay it in its own context)"
                    )
                return None
            self._stash[index] = None
            session = step.session
            if session is None:
                return None
            if not (isinstance(output, tuple) and len(output) == 3):
                raise RuntimeError(
                    "router returned something other than (router_logits, topk_weights, topk_indices); "
                    "this transformers version is not supported (need >= 5.17)"
                )
            logits, _, native_ids = output
            calls = step.calls[index]
            step.calls[index] = calls + 1
            if session.mode == "record":
                if calls == 0:
                    step.recorded[index] = native_ids.detach().to(torch.long)
                return None
            assert session.routing is not None
            ids = session.routing[:, :, index].reshape(-1, session.routing.shape[-1])
            if logits.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"MoE layer {index} (model layer {self.moe_layer_ids[index]}): the router received "
                    f"{logits.shape[0]} tokens but the routing covers B*T = {ids.shape[0]}"
                )
            ids = ids.to(device=native_ids.device, dtype=torch.long, non_blocking=True)
            if session.flat_mask is not None:
                ids = torch.where(session.flat_mask.to(native_ids.device), ids, native_ids)
            hidden_dtype = args[0].dtype if args and isinstance(args[0], torch.Tensor) else logits.dtype
            gates = session.gate_weights(router, logits, ids, hidden_dtype)
            if calls == 0 and session.keep_aux:
                step.aux[index] = (logits, ids)
            return logits, gates, ids

        return hook
