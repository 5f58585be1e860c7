"""GPT-OSS: every layer MoE; biased router (top-k of logits, softmax over the k); clamped-SwiGLU experts with
biases; attention with q/k/v/o biases, learned per-head sinks and alternating sliding-window layers; YaRN rope.

The checkpoint's names and fused expert layout are transformers' runtime ones; the one difference is the router:
transformers' `mlp.router` is our `mlp.gate` (SparseMoE's name for every family), renamed on load and sync.
Tensor parallelism splits heads (sinks included) and every expert's intermediate dimension.
"""

from routereplay.layers.gpt_oss import GptOssAttention, GptOssExperts, GptOssRouter
from routereplay.models.family import Family

FAMILY = Family(
    model_type="gpt_oss",
    is_moe_layer=lambda c, i: True,
    num_experts=lambda c: c.num_local_experts,
    top_k=lambda c: c.num_experts_per_tok,
    make_router=lambda c: GptOssRouter(c.hidden_size, c.num_local_experts, c.num_experts_per_tok),
    make_attention=GptOssAttention,
    make_experts=GptOssExperts,
    renames=((r"\.mlp\.router\.", ".mlp.gate."),),
    fp8=False,  # ships MXFP4 experts; its biased, clamped experts have no FP8 path
)
