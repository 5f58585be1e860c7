"""Dense SwiGLU MLP (dense layers and shared experts); gate/up column-parallel, down row-parallel."""

import torch
import torch.nn.functional as F
from torch import nn

from routereplay.layers.parallel import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
