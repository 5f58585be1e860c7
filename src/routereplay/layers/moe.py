"""MoE block: router -> routing record -> experts (+ shared experts).

Each router reproduces its family's reference selection exactly, dtypes included (GLM and ERNIE
route in fp32 with fp32 router weights; Qwen and Mixtral compute logits in the model dtype and the
softmax in fp32). The selected ids are written into the routing cache right after selection.
"""

import torch
import torch.nn.functional as F
from torch import nn

from routereplay import kernels
from routereplay.context import get_context
from routereplay.kernels.fp8 import fused_moe_fp8
from routereplay.layers.mlp import MLP
from routereplay.layers.parallel import TP, all_reduce, check_shard_on_blocks, fp8_parameters


class SoftmaxTopKRouter(nn.Module):
    """Qwen2/Qwen3-MoE and Mixtral: softmax over all experts, top-k, optional renormalisation. Writes the
    routing record itself (one kernel with the epilogue on CUDA)."""

    writes_routing = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor, record: kernels.RoutingRecord | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.softmax_topk(F.linear(x, self.weight), self.top_k, self.norm_topk_prob, record)


class ErnieRouter(nn.Module):
    """ERNIE-4.5: fp32 softmax; the correction bias (moe_statics) only picks, weights always normalised."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.moe_statics = nn.Module()
        self.moe_statics.e_score_correction_bias = nn.Parameter(
            torch.zeros(1, num_experts, dtype=torch.float32), requires_grad=False
        )
        self.top_k, self.norm_min = top_k, norm_min

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(F.linear(x.float(), self.weight), dim=-1)
        ids = torch.topk(probs + self.moe_statics.e_score_correction_bias[0], self.top_k, dim=-1)[1]
        weights = probs.gather(-1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)
        return ids, weights.to(x.dtype).float()


class GroupedSigmoidRouter(nn.Module):
    """GLM-4.5 / DeepSeek-V3: fp32 sigmoid scores, correction bias for selection only, group-limited top-k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32), requires_grad=False
        )
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor

    @classmethod
    def from_config(cls, c) -> "GroupedSigmoidRouter":
        """GLM-4.5 and DeepSeek-V3 name these fields alike."""
        return cls(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group,
                   c.norm_topk_prob, c.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias
        n, e = choice.shape
        grouped = choice.view(n, self.n_group, e // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, e).bool()
        ids = torch.topk(choice.masked_fill(~expert_mask, float("-inf")), self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.routed_scaling_factor


class Experts(nn.Module):
    """Routed experts stored fused like transformers' runtime layout: gate_up_proj [E, 2I, H], down_proj [E, H, I].

    Under tensor parallelism each rank holds every expert's slice I/tp of the intermediate dimension. After
    ``to_fp8_`` both are e4m3 beside ``gate_up_proj_scale_inv`` / ``down_proj_scale_inv`` (transformers' names).
    """

    block: tuple[int, int] | None = None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        inter = intermediate_size // TP.size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, inter))

    def to_fp8_(self, block: tuple[int, int], name: str) -> None:
        inter = self.down_proj.shape[2]
        if inter % block[0]:  # gate and up share one scale tensor: no block may straddle the two
            raise ValueError(f"{name}.gate_up_proj: each expert's gate and up have {inter} rows"
                             f"{' per rank' if TP.size > 1 else ''}, not a multiple of weight_block_size block_n "
                             f"{block[0]}: they are fused into one tensor whose blocks must not straddle them")
        check_shard_on_blocks(f"{name}.down_proj", inter, block[1], "block_k")
        dev = self.gate_up_proj.device
        self.gate_up_proj, self.gate_up_proj_scale_inv = fp8_parameters(tuple(self.gate_up_proj.shape), block, dev)
        self.down_proj, self.down_proj_scale_inv = fp8_parameters(tuple(self.down_proj.shape), block, dev)
        self.block = tuple(block)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out_dtype = None if TP.size == 1 else torch.float32  # fp32 partials, one rounding after the sum
        if self.block is None:
            out = kernels.fused_moe(x, self.gate_up_proj, self.down_proj, ids, weights, out_dtype=out_dtype)
        else:
            out = fused_moe_fp8(x, self.gate_up_proj, self.down_proj, ids, weights, self.gate_up_proj_scale_inv,
                                self.down_proj_scale_inv, self.block, out_dtype=out_dtype)
        return out if TP.size == 1 else all_reduce(out).to(x.dtype)


def routing_record(moe_index: int) -> kernels.RoutingRecord | None:
    """Where this step's selection of MoE layer ``moe_index`` goes: the routing cache at the step's KV slots
    (written on the device, no host sync); None when capture is off.

    Padding rows carry slot -1, which indexes the cache's extra last row: a scratch row nobody reads.
    """
    ctx = get_context()
    if ctx.routing_cache is None:
        return None
    return kernels.RoutingRecord(ctx.routing_cache, ctx.slot_mapping, moe_index,
                                 ctx.positions if ctx.routing_debug else None)


class SparseMoE(nn.Module):
    def __init__(self, router: nn.Module, experts: Experts, moe_index: int,
                 shared_experts: MLP | None = None, shared_expert_gate: nn.Linear | None = None,
                 shared_name: str = "shared_experts") -> None:
        super().__init__()
        self.gate, self.experts, self.moe_index = router, experts, moe_index
        self.shared_name = shared_name
        if shared_experts is not None:
            setattr(self, shared_name, shared_experts)
        if shared_expert_gate is not None:
            self.shared_expert_gate = shared_expert_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        record = routing_record(self.moe_index)
        if getattr(self.gate, "writes_routing", False):
            ids, weights = self.gate(x, record)
        else:
            ids, weights = self.gate(x)
            if record is not None:
                record.write(ids)
        out = self.experts(x, ids, weights)
        shared = getattr(self, self.shared_name, None)
        if shared is not None:
            s = shared(x)
            if hasattr(self, "shared_expert_gate"):
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            out = out + s
        return out
