"""The decoder shared by every family: embed -> [attention, dense MLP or MoE] x L -> norm -> lm_head.

Module and parameter names equal transformers' runtime names (experts fused as gate_up_proj /
down_proj), so a trainer's `named_parameters()` can be synced in without translation.
"""

import torch
from torch import nn

from routereplay.layers.attention import Attention
from routereplay.layers.mlp import MLP
from routereplay.layers.moe import Experts, SparseMoE
from routereplay.layers.norm import RMSNorm
from routereplay.models.family import Family


class DecoderLayer(nn.Module):
    def __init__(self, family: Family, c, layer_idx: int, moe_index: int | None) -> None:
        super().__init__()
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
                Experts(family.num_experts(c), c.hidden_size, inter),
                moe_index,
                shared_experts=MLP(c.hidden_size, shared_size, bias) if shared_size else None,
                shared_expert_gate=nn.Linear(c.hidden_size, 1, bias=False) if gated else None,
                shared_name=family.shared or "shared_experts",
            )
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, family: Family, c, moe_layer_ids: list[int]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        moe_index = {layer: j for j, layer in enumerate(moe_layer_ids)}
        self.layers = nn.ModuleList(
            DecoderLayer(family, c, i, moe_index.get(i)) for i in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class MoECausalLM(nn.Module):
    """forward(input_ids [N]) -> hidden [N, H]; compute_logits(hidden) -> [N, V] in fp32.

    The token layout, positions and KV slots come from the forward context (engine.context).
    """

    def __init__(self, family: Family, hf_config, moe_layer_ids: list[int]) -> None:
        super().__init__()
        self.family = family
        self.hf_config = hf_config
        self.model = Backbone(family, hf_config, moe_layer_ids)
        self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        if hf_config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
