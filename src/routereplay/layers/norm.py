"""RMSNorm, computed the way transformers does (fp32 statistics, cast back before the weight).

On CUDA one Triton kernel per call (``kernels.fused``); ``forward_add`` also fuses the residual add.
"""

import torch
from torch import nn

from routereplay.kernels.fused import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward_add(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = residual + delta``; returns ``(h, self(h))``."""
        return add_rms_norm(residual, delta, self.weight, self.eps)
