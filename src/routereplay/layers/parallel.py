"""Tensor parallelism (Megatron style) for one host: which slice of a weight this rank holds, and
the two collectives a layer needs. With one rank every function is the identity and no
torch.distributed call is made.

Sharding, per layer:
- attention: q/k/v column-parallel by heads (each rank: heads/tp query heads, kv_heads/tp kv heads,
  and the matching KV cache), o_proj row-parallel, then all-reduce;
- dense MLP and shared experts: gate/up column-parallel, down row-parallel, then all-reduce;
- routed experts: the intermediate dimension is split (every rank holds every expert, 1/tp of each),
  then all-reduce. The router weight is replicated and its input is identical on every rank after
  the preceding all-reduce, so every rank selects the same experts; rank 0 records them;
- embedding vocab-parallel (rows outside the rank's range give zeros, then all-reduce), LM head
  column-parallel by vocab, logits gathered to every rank.

Block-FP8 linears (`to_fp8_`) shard their ``weight_scale_inv`` along the weight's split dimension; a shard must
start on a block boundary, so each rank's scales are exactly its slice of the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from routereplay.kernels.fp8 import FP8_DTYPE, fp8_linear


@dataclass(slots=True)
class TPState:
    rank: int = 0
    size: int = 1


TP = TPState()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if TP.size > 1:
        dist.all_reduce(x)
    return x


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # bf16/fp16 GEMM with an fp32 result (CUDA)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` returned in fp32, unrounded: a partial sum to be reduced across ranks."""
    if x.dtype == torch.float32:
        return F.linear(x, weight)
    if x.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
    return F.linear(x.float(), weight.float())


def shard_range(full: int) -> tuple[int, int]:
    """[start, end) of this rank's slice of a dimension of size `full`."""
    part = full // TP.size
    return TP.rank * part, (TP.rank + 1) * part


def mark(param: nn.Parameter, dim: int | None) -> nn.Parameter:
    """Record along which dimension the checkpoint tensor is split across ranks (None: replicated)."""
    param.tp_dim = dim
    return param


def check_shard_on_blocks(name: str, local: int, block: int, axis: str) -> None:
    """A tensor-parallel shard of a block-FP8 weight must start on a block boundary, so that each rank's
    scales are exactly its slice of the checkpoint's (axis: "block_n" for rows, "block_k" for columns)."""
    if TP.size > 1 and local % block:
        raise ValueError(f"{name}: tensor_parallel_size {TP.size} leaves each rank {local} of its {local * TP.size} "
                         f"{'rows' if axis == 'block_n' else 'columns'}, not a multiple of weight_block_size {axis} "
                         f"{block}: a shard must start on a block boundary")


def fp8_parameters(shape: tuple[int, ...], block: tuple[int, int], device: torch.device,
                   tp_dim: int | None = None) -> tuple[nn.Parameter, nn.Parameter]:
    """An empty e4m3 weight ``[..., N, K]`` and its fp32 ``scale_inv [..., ceil(N/bn), ceil(K/bk)]`` (the loader
    fills both), split across ranks along ``tp_dim`` alike."""
    *lead, n, k = shape
    weight = nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE, device=device), requires_grad=False)
    scale = nn.Parameter(torch.empty(*lead, -(-n // block[0]), -(-k // block[1]), dtype=torch.float32,
                                     device=device), requires_grad=False)
    weight.block = tuple(block)  # the loader quantizes trainer tensors into it with this block
    return mark(weight, tp_dim), mark(scale, tp_dim)


class ReplicatedLinear(nn.Linear):
    """``nn.Linear`` (every rank holds all of it) that may hold block-FP8 weights: after ``to_fp8_`` the weight is
    e4m3 beside its ``weight_scale_inv`` and the forward is the FP8 GEMM (activations quantized per token group)."""

    block: tuple[int, int] | None = None

    def to_fp8_(self, block: tuple[int, int], name: str) -> None:
        dim = getattr(self.weight, "tp_dim", None)  # 0: column-parallel (rows split), 1: row-parallel
        if dim is not None:
            check_shard_on_blocks(f"{name}.weight", self.weight.shape[dim], block[dim], ("block_n", "block_k")[dim])
        self.weight, self.weight_scale_inv = fp8_parameters(tuple(self.weight.shape), block, self.weight.device, dim)
        self.block = tuple(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return F.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias)


class ColumnParallelLinear(ReplicatedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features // TP.size, bias=bias)
        mark(self.weight, 0)
        if bias:
            mark(self.bias, 0)


class RowParallelLinear(ReplicatedLinear):
    """Partial products summed across ranks; the bias is added once, after the sum.

    The partial products are reduced in fp32 and rounded once, like TP=1's single GEMM: reducing
    bf16 partials rounds twice, and those one-ulp differences in the residual stream flip near-tied
    router choices (measured: 4.6% of (token, layer) sets on CPU, 7.9% on H200s).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features // TP.size, out_features, bias=bias)
        mark(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is not None:
            y = fp8_linear(x, self.weight, self.weight_scale_inv, self.block,
                           out_dtype=None if TP.size == 1 else torch.float32)
            y = y if TP.size == 1 else all_reduce(y).to(x.dtype)
        else:
            y = F.linear(x, self.weight) if TP.size == 1 else all_reduce(linear_fp32(x, self.weight)).to(x.dtype)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__(vocab // TP.size if vocab % TP.size == 0 else vocab, dim)
        self.sharded = TP.size > 1 and vocab % TP.size == 0
        mark(self.weight, 0 if self.sharded else None)
        self.start = shard_range(vocab)[0] if self.sharded else 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return super().forward(ids)
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * inside[:, None]
        return all_reduce(out)


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's slice of the last dimension (vocab-parallel logits)."""
    if TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(TP.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
