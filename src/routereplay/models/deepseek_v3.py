"""DeepSeek-V3 / R1, Kimi-K2, Moonlight-16B-A3B: multi-head latent attention with a compressed cache
(layers/mla.py), sigmoid + correction bias group-limited top-k with routed scaling, shared experts,
first_k_dense_replace dense layers; MTP layers beyond num_hidden_layers in checkpoints are skipped."""

from routereplay.layers.mla import MLAttention
from routereplay.layers.moe import GroupedSigmoidRouter
from routereplay.models.family import Family, extra_layer_index

FAMILY = Family(
    model_type="deepseek_v3",
    is_moe_layer=lambda c, i: i >= c.first_k_dense_replace,
    num_experts=lambda c: c.n_routed_experts,
    top_k=lambda c: c.num_experts_per_tok,
    make_router=GroupedSigmoidRouter.from_config,
    shared="shared_experts",
    shared_intermediate=lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
    ignore=extra_layer_index,
    make_attention=lambda c, layer_idx: MLAttention(c),
)
