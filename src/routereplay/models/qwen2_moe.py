"""Qwen2-MoE / Qwen1.5-MoE: softmax top-k plus one sigmoid-gated shared expert; q/k/v biases."""

from routereplay.layers.moe import SoftmaxTopKRouter
from routereplay.models.family import Family
from routereplay.models.qwen3_moe import is_sparse_step_moe

FAMILY = Family(
    model_type="qwen2_moe",
    is_moe_layer=is_sparse_step_moe,
    num_experts=lambda c: c.num_experts,
    top_k=lambda c: c.num_experts_per_tok,
    make_router=lambda c: SoftmaxTopKRouter(c.hidden_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob),
    qkv_bias=lambda c: getattr(c, "qkv_bias", True),
    shared="shared_expert",
    shared_intermediate=lambda c: c.shared_expert_intermediate_size,
)
