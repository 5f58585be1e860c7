"""What distinguishes each supported router family: its router class and how it turns scores into gate weights.

A router is recognised by its class *or any base class* having the family's router class name, so the
subclasses that wrappers create at runtime still match: FSDP2's ``FSDP<Name>`` (``fully_shard`` on the
router), ``torch.nn.utils.parametrize``'s ``Parametrized<Name>`` (PEFT LoRA on the router weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
class Family:
    name: str
    router_class: str
    gate_weights: GateWeights


FAMILIES = (
    Family("qwen3_moe", "Qwen3MoeTopKRouter", _softmax_gates),
    Family("qwen2_moe", "Qwen2MoeTopKRouter", _softmax_gates),
    Family("olmoe", "OlmoeTopKRouter", _softmax_gates),
    Family("mixtral", "MixtralTopKRouter", _mixtral_gates),
    Family("ernie4_5_moe", "Ernie4_5_MoeTopKRouter", _ernie_gates),
    Family("glm4_moe", "Glm4MoeTopkRouter", _grouped_sigmoid_gates),
    Family("deepseek_v3", "DeepseekV3TopkRouter", _grouped_sigmoid_gates),
    Family("gpt_oss", "GptOssTopKRouter", _gpt_oss_gates),
)
_BY_ROUTER_CLASS = {family.router_class: family for family in FAMILIES}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(family.name for family in FAMILIES)
"""transformers ``model_type`` values whose routers RoutingReplay can patch."""


def family_of(module: nn.Module) -> Family | None:
    """The family whose router ``module`` is (its class or a base class is the family's router class)."""
    for cls in type(module).__mro__:
        family = _BY_ROUTER_CLASS.get(cls.__name__)
        if family is not None:
            return family
    return None
