"""What distinguishes one MoE family from another, stated as data (one `Family` per model_type)."""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True, slots=True)
class Family:
    model_type: str
    is_moe_layer: Callable[[object, int], bool]  # (hf_config, layer index) -> MoE or dense
    num_experts: Callable[[object], int]
    top_k: Callable[[object], int]
    make_router: Callable[[object], nn.Module]
    qkv_bias: Callable[[object], bool] = lambda c: False
    o_bias: Callable[[object], bool] = lambda c: False
    mlp_bias: Callable[[object], bool] = lambda c: False
    qk_norm: Callable[[object], bool] = lambda c: False
    interleaved_rope: bool = False
    # "shared_experts" (plain add), "shared_expert" (Qwen2-MoE: sigmoid-gated), or None
    shared: str | None = None
    shared_intermediate: Callable[[object], int] = lambda c: 0
    # checkpoint (Hub) name -> runtime name, applied in order before the per-expert mapping
    renames: tuple[tuple[str, str], ...] = ()
    # per-expert checkpoint names of gate, up, down
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # checkpoint tensors we knowingly do not use (e.g. GLM's multi-token-prediction layers)
    ignore: Callable[[object, str], bool] = lambda c, name: False
    # Families whose attention or experts differ in kind (MLA, attention sinks, biased experts) build
    # their own; the module must offer `cache_spec()` (attention) / the Experts call signature.
    make_attention: Callable[[object, int], nn.Module] | None = None
    make_experts: Callable[[object], nn.Module] | None = None
    fp8: bool = True  # block-FP8 weights supported (the standard linears and SwiGLU experts)
    renames_compiled: tuple = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "renames_compiled", tuple((re.compile(p), r) for p, r in self.renames))


def extra_layer_index(config, name: str) -> bool:
    """True for `model.layers.{i}` with i beyond num_hidden_layers (MTP / next-n prediction layers)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= config.num_hidden_layers
