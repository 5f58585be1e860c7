"""The decoder shared by every family: embed -> [attention, dense MLP or MoE] x L -> norm -> lm_head.

Module and parameter names equal transformers' runtime names (experts fused as gate_up_proj /
down_proj), so a trainer's `named_parameters()` can be synced in without translation. With block-FP8
(`quant`), each decoder layer's linears and routed experts that the checkpoint converts hold e4m3 weights
beside their `weight_scale_inv`; routers, norms, gates, embeddings and the LM head keep the model dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from routereplay.context import get_context
from routereplay.layers.attention import Attention
from routereplay.layers.mlp import MLP
from routereplay.layers.moe import Experts, SparseMoE
from routereplay.layers.norm import RMSNorm
from routereplay.layers.parallel import (
    ColumnParallelLinear,
    ReplicatedLinear,
    VocabParallelEmbedding,
    gather_last_dim,
)
from routereplay.models.family import Family

if TYPE_CHECKING:
    from routereplay.config import Fp8Config


def to_fp8_(layer: nn.Module, prefix: str, quant: Fp8Config) -> None:
    """Block-FP8 for every linear and routed-expert module of ``layer`` that ``quant`` converts (by module name)."""
    for name, module in layer.named_modules(prefix=prefix):
        if isinstance(module, (ReplicatedLinear, Experts)) and quant.converts(name):
            module.to_fp8_(quant.block, name)


class DecoderLayer(nn.Module):
    def __init__(self, family: Family, c, layer_idx: int, moe_index: int | None) -> None:
        super().__init__()
        if family.make_attention is not None:
            self.self_attn = family.make_attention(c, layer_idx)
        else:
            self.self_attn = Attention(
                c, qkv_bias=family.qkv_bias(c), o_bias=family.o_bias(c), qk_norm=family.qk_norm(c),
                interleaved_rope=family.interleaved_rope,
            )
        bias = family.mlp_bias(c)
        if moe_index is None:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, bias)
        else:
            inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
            shared_size = family.shared_intermediate(c) if family.shared else 0
            gated = family.shared == "shared_expert"
            self.mlp = SparseMoE(
                family.make_router(c),
                family.make_experts(c) if family.make_experts else Experts(family.num_experts(c), c.hidden_size, inter),
                moe_index,
                shared_experts=MLP(c.hidden_size, shared_size, bias) if shared_size else None,
                shared_expert_gate=nn.Linear(c.hidden_size, 1, bias=False) if gated else None,
                shared_name=family.shared or "shared_experts",
            )
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream carried unadded (vLLM style), so each add fuses with the norm after it.

        ``residual + h`` is the hidden state entering this layer (``residual`` None: ``h`` is, the first
        layer). Returns ``(mlp output, residual)``, whose sum is the layer's output. The adds happen in the
        same order as ``h = h + attn(norm(h)); h = h + mlp(norm(h))``, so results are bit-identical.
        """
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            residual, x = self.input_layernorm.forward_add(residual, h)
        residual, x = self.post_attention_layernorm.forward_add(residual, self.self_attn(x))
        return self.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, family: Family, c, moe_layer_ids: list[int], quant: Fp8Config | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size)
        moe_index = {layer: j for j, layer in enumerate(moe_layer_ids)}
        self.layers = nn.ModuleList()
        for i in range(c.num_hidden_layers):
            layer = DecoderLayer(family, c, i, moe_index.get(i))
            if quant is not None:  # layer by layer: the model never holds all its weights in both dtypes
                to_fp8_(layer, f"model.layers.{i}", quant)
            self.layers.append(layer)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        ctx = get_context()
        if ctx.positions is not None:  # rotary cos/sin once per forward; every layer reads them
            ctx.rope_cos, ctx.rope_sin = self.layers[0].self_attn.rotary.cos_sin(ctx.positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual)
        return self.norm(h) if residual is None else self.norm.forward_add(residual, h)[1]


class MoECausalLM(nn.Module):
    """forward(input_ids [N]) -> hidden [N, H]; compute_logits(hidden) -> [N, V] in fp32.

    The token layout, positions and KV slots come from the forward context (routereplay.context).
    """

    def __init__(self, family: Family, hf_config, moe_layer_ids: list[int], quant: Fp8Config | None = None) -> None:
        super().__init__()
        self.family = family
        self.hf_config = hf_config
        self.quant = quant
        self.model = Backbone(family, hf_config, moe_layer_ids, quant)
        # Vocab-parallel when the embedding is (its rows and the head's rows are the same split).
        if self.model.embed_tokens.sharded:
            self.lm_head = ColumnParallelLinear(hf_config.hidden_size, hf_config.vocab_size)
        else:
            self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        if hf_config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        return gather_last_dim(logits) if self.model.embed_tokens.sharded else logits
