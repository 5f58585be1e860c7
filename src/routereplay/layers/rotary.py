"""Rotary position embedding: full or partial (GLM), half-split or interleaved pairs (ERNIE)."""

import torch
from torch import nn


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
    return inv.float(), float(scaling), rotary_dim


class Rotary(nn.Module):
    """cos/sin are computed per call from the positions (cheap, exact, no table size limit)."""

    def __init__(self, hf_config, head_dim: int, interleaved: bool) -> None:
        super().__init__()
        inv, self.scaling, self.rotary_dim = _inv_freq(hf_config, head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [N, Hq, D], k: [N, Hk, D], positions: [N]."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        if self.interleaved:
            # ERNIE rotates (x0, x1), (x2, x3), ... pairs in fp32.
            cos = (freqs.cos() * self.scaling).repeat_interleave(2, -1)[:, None]
            sin = (freqs.sin() * self.scaling).repeat_interleave(2, -1)[:, None]
            return _rot_interleaved(q, cos, sin), _rot_interleaved(k, cos, sin)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(q.dtype)[:, None]
        sin = (emb.sin() * self.scaling).to(q.dtype)[:, None]
        return _rot_half(q, cos, sin, self.rotary_dim), _rot_half(k, cos, sin, self.rotary_dim)


def _rot_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    rot, rest = x[..., :dim], x[..., dim:]
    x1, x2 = rot[..., : dim // 2], rot[..., dim // 2 :]
    out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def _rot_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return (x.float() * cos + pairs.float() * sin).to(x.dtype)
