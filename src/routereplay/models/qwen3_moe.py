"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax top-k, qk-norm, decoder_sparse_step, mlp_only_layers."""

from routereplay.layers.moe import SoftmaxTopKRouter
from routereplay.models.family import Family


def is_sparse_step_moe(c, i: int) -> bool:
    return i not in (c.mlp_only_layers or []) and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0


FAMILY = Family(
    model_type="qwen3_moe",
    is_moe_layer=is_sparse_step_moe,
    num_experts=lambda c: c.num_experts,
    top_k=lambda c: c.num_experts_per_tok,
    make_router=lambda c: SoftmaxTopKRouter(c.hidden_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob),
    qkv_bias=lambda c: getattr(c, "attention_bias", False),
    o_bias=lambda c: getattr(c, "attention_bias", False),
    qk_norm=lambda c: True,
)
