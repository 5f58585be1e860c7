"""GLM-4.5 / 4.6: sigmoid + correction bias, group-limited top-k, routed scaling, shared experts,
first_k_dense_replace dense layers, partial rotary, optional qk-norm; MTP layers in checkpoints are skipped."""

from routereplay.layers.moe import GroupedSigmoidRouter
from routereplay.models.family import Family, extra_layer_index

FAMILY = Family(
    model_type="glm4_moe",
    is_moe_layer=lambda c, i: i >= c.first_k_dense_replace,
    num_experts=lambda c: c.n_routed_experts,
    top_k=lambda c: c.num_experts_per_tok,
    make_router=GroupedSigmoidRouter.from_config,
    qkv_bias=lambda c: getattr(c, "attention_bias", False),
    qk_norm=lambda c: getattr(c, "use_qk_norm", False),
    shared="shared_experts",
    shared_intermediate=lambda c: c.moe_intermediate_size * c.n_shared_experts,
    ignore=extra_layer_index,
)
