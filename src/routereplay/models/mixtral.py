"""Mixtral: every layer MoE, softmax top-k always renormalised; checkpoint uses block_sparse_moe / w1 w3 w2."""

from routereplay.layers.moe import SoftmaxTopKRouter
from routereplay.models.family import Family

FAMILY = Family(
    model_type="mixtral",
    is_moe_layer=lambda c, i: True,
    num_experts=lambda c: c.num_local_experts,
    top_k=lambda c: c.num_experts_per_tok,
    make_router=lambda c: SoftmaxTopKRouter(c.hidden_size, c.num_local_experts, c.num_experts_per_tok, True),
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
    expert_names=("w1", "w3", "w2"),
)
