"""Rotary position embedding: full or partial (GLM), half-split or interleaved pairs (ERNIE).

cos/sin depend only on the positions, so the model computes them once per forward (``Rotary.cos_sin``, stored
in the forward context by ``Backbone.forward``) and every layer only rotates.
"""

import torch
from torch import nn

from routereplay.kernels.fused import rope_ref


def _inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float, int]:
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    if rope.get("rope_type", "default") == "default":
        base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        return inv, 1.0, rotary_dim
    # Scaled variants (yarn, llama3, ...): transformers' own parameter functions, so frequencies match exactly.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    return inv.float().to(torch.get_default_device()), float(scaling), rotary_dim  # the model is built on its device


class Rotary(nn.Module):
    """cos/sin are computed from the positions (cheap, exact, no table size limit)."""

    def __init__(self, hf_config, head_dim: int, interleaved: bool) -> None:
        super().__init__()
        inv, self.scaling, self.rotary_dim = _inv_freq(hf_config, head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[N, rotary_dim]`` for q/k of ``dtype``: in that dtype (half-split) or fp32 (interleaved)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        if self.interleaved:
            # ERNIE rotates (x0, x1), (x2, x3), ... pairs in fp32.
            cos = (freqs.cos() * self.scaling).repeat_interleave(2, -1)
            sin = (freqs.sin() * self.scaling).repeat_interleave(2, -1)
            return cos, sin
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def cos_sin_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.interleaved else dtype

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [N, Hq, D], k: [N, Hk, D], positions: [N] (reference path; layers use cached cos/sin)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return (rope_ref(q, cos, sin, self.rotary_dim, self.interleaved),
                rope_ref(k, cos, sin, self.rotary_dim, self.interleaved))
