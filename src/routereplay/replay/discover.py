"""Find a transformers MoE model's routers by what they are, through the wrappers training puts around them.

Wrappers change a model in three ways, and each is handled here:

- **rename**: DDP (``module.``), ``torch.compile`` (``_orig_mod.``), FSDP2 (``fully_shard`` swaps the
  class of each sharded module for an ``FSDP<Name>`` subclass), ``checkpoint_wrapper``
  (``._checkpoint_wrapped_module``). Routers are matched on their class hierarchy (``families.family_of``)
  and the decoder layer is read from the ``layers.<i>.`` part of the module path, so neither matters.
- **duplicate**: PEFT ``modules_to_save=["gate"]`` keeps the frozen ``original_module`` and one trainable
  copy per adapter. Every copy of a layer's router is hooked; whichever runs in a forward (the active
  one) is the one replayed, and each layer counts as reached once whichever copy ran.
- **re-parametrise**: PEFT LoRA on the router weight (``target_parameters``) wraps the router in a
  ``ParamWrapper`` whose ``base_layer`` is the real router, parametrised during the forward. The real
  router is found below the wrapper and its output (with the LoRA delta in its logits) is what is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from routereplay.replay.families import SUPPORTED_FAMILIES, Family, family_of

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?=\.)")


@dataclass
class MoeLayer:
    """One MoE layer: its model layer index and every copy of its router."""

    layer_id: int
    decoder_name: str
    router_names: list[str] = field(default_factory=list)
    routers: list[nn.Module] = field(default_factory=list)

    @property
    def primary(self) -> nn.Module:
        """The copy that trains (PEFT freezes ``original_module``); the only one when there are no copies."""
        trainable = [r for r in self.routers if any(p.requires_grad for p in r.parameters())]
        return (trainable or self.routers)[-1]


@dataclass
class FoundRouters:
    family: Family
    base_name: str
    """Path of the module whose forward runs the decoder layers (the parent of ``layers``)."""
    layers: list[MoeLayer]
    decoder_names: list[str]
    """Every decoder layer (dense ones too), in model order."""


def model_type_of(model: nn.Module) -> str | None:
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def _looks_like_router(name: str, module: nn.Module) -> bool:
    last = name.rpartition(".")[2].lower()
    return hasattr(module, "top_k") or "router" in type(module).__name__.lower() or last in ("gate", "router")


def _not_found_message(model: nn.Module) -> str:
    suspects = [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if name and _looks_like_router(name, module)
    ]
    found = (
        f"; modules that look like routers but are not of a supported family: {', '.join(suspects[:6])}"
        + (f" and {len(suspects) - 6} more" if len(suspects) > 6 else "")
        if suspects
        else "; no module looks like a router"
    )
    return (
        f"{type(model).__name__} (model_type {model_type_of(model)!r}) is not supported: no router of a "
        f"supported family ({', '.join(SUPPORTED_FAMILIES)}) was found{found}"
    )


def find_routers(model: nn.Module) -> FoundRouters:
    """Every router of ``model`` grouped by MoE layer, with the modules replay needs around them.

    Raises ValueError naming what was found when the model has no supported router, mixes families,
    has a router outside a ``layers.<i>`` decoder layer, or has layers whose routers disagree in
    number of experts or top-k.
    """
    found: list[tuple[str, nn.Module, Family]] = []
    for name, module in model.named_modules():
        family = family_of(module)
        if family is not None:
            found.append((name, module, family))
    if not found:
        raise ValueError(_not_found_message(model))
    families = sorted({family.name for _, _, family in found})
    if len(families) > 1:
        raise ValueError(f"model mixes router families {families}: {[name for name, _, _ in found]}")
    for name, module, _ in found:
        missing = [attr for attr in ("top_k", "num_experts", "weight") if not hasattr(module, attr)]
        if missing:
            raise ValueError(f"router {name} ({type(module).__name__}) has no {', '.join(missing)}")

    by_layer: dict[int, MoeLayer] = {}
    bases = set()
    for name, module, _ in found:
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise ValueError(f"cannot tell the decoder layer of router {name!r} (no 'layers.<i>.' in its path)")
        layer_id = int(match.group(1))
        decoder_name = name[: match.end()]
        bases.add(name[: match.start()])
        layer = by_layer.setdefault(layer_id, MoeLayer(layer_id, decoder_name))
        if layer.decoder_name != decoder_name:
            raise ValueError(f"routers of layer {layer_id} sit in two decoder layers: {layer.router_names + [name]}")
        layer.router_names.append(name)
        layer.routers.append(module)
    if len(bases) > 1:
        raise ValueError(f"routers sit in more than one stack of decoder layers: {sorted(bases)}")
    base_name = bases.pop()
    layers = [by_layer[i] for i in sorted(by_layer)]
    for layer in layers:
        shapes = {(int(r.num_experts), int(r.top_k)) for r in layer.routers}
        if len(shapes) > 1:
            raise ValueError(f"copies of the router of layer {layer.layer_id} differ: {layer.router_names}")
    shapes = {(int(layer.primary.num_experts), int(layer.primary.top_k)) for layer in layers}
    if len(shapes) != 1:
        raise ValueError(f"routers differ in (number of experts, top-k): {sorted(shapes)}")

    container_name = f"{base_name}.layers".lstrip(".")
    container = model.get_submodule(container_name)
    decoder_names = [f"{container_name}.{child}" for child, _ in container.named_children()]
    return FoundRouters(found[0][2], base_name, layers, decoder_names)
