"""GPU kernels of the rollout engine, each beside its plain-PyTorch reference.

Every public function dispatches: CUDA tensors with Triton importable -> Triton kernel (no host sync,
CUDA-graph capturable); anything else -> the PyTorch reference, which is also the engine's CPU path.
"""

from routereplay.kernels.attention import HAS_TRITON, decode_attention, prefill_attention, store_kv
from routereplay.kernels.fp8 import fp8_linear, fused_moe_fp8
from routereplay.kernels.moe import fused_moe
from routereplay.kernels.router import RoutingRecord, record_routing, softmax_topk

__all__ = ["HAS_TRITON", "RoutingRecord", "decode_attention", "fused_moe", "prefill_attention", "record_routing",
           "softmax_topk", "store_kv"]
__all__ += ["fp8_linear", "fused_moe_fp8"]
