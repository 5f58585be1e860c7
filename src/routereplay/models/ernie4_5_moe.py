"""ERNIE-4.5-MoE (21B-A3B, 300B-A47B): fp32 softmax router, moe_statics correction bias for selection,
normalised weights clamped by moe_norm_min, shared experts, MoE layers by start/end/interval, interleaved rope."""

from routereplay.layers.moe import ErnieRouter
from routereplay.models.family import Family, extra_layer_index


def is_moe_layer(c, i: int) -> bool:
    end = c.moe_layer_end_index if c.moe_layer_end_index not in (None, -1) else c.num_hidden_layers - 1
    return (i + 1) % c.moe_layer_interval == 0 and c.moe_layer_start_index <= i <= end


FAMILY = Family(
    model_type="ernie4_5_moe",
    is_moe_layer=is_moe_layer,
    num_experts=lambda c: c.moe_num_experts,
    top_k=lambda c: c.moe_k,
    make_router=lambda c: ErnieRouter(c.hidden_size, c.moe_num_experts, c.moe_k, c.moe_norm_min),
    qkv_bias=lambda c: c.use_bias,
    o_bias=lambda c: c.use_bias,
    mlp_bias=lambda c: c.use_bias,
    interleaved_rope=True,
    shared="shared_experts",
    shared_intermediate=lambda c: c.moe_intermediate_size * (c.moe_num_shared_experts or 0),
    renames=((r"\.mlp\.moe_statics\.", ".mlp.gate.moe_statics."),),
    ignore=lambda c, name: extra_layer_index(c, name) or name.startswith("model.mtp"),
)
