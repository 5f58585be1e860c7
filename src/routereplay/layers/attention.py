"""Self-attention over the paged KV cache (or plain causal attention when no cache is attached)."""

import torch
import torch.nn.functional as F
from torch import nn

from routereplay import kernels
from routereplay.context import get_context
from routereplay.kernels.fused import qk_norm_rope
from routereplay.layers.norm import RMSNorm
from routereplay.layers.parallel import TP, ColumnParallelLinear, RowParallelLinear
from routereplay.layers.rotary import Rotary


class Attention(nn.Module):
    def __init__(self, hf_config, *, qkv_bias: bool, o_bias: bool, qk_norm: bool, interleaved_rope: bool):
        super().__init__()
        c = hf_config
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim**-0.5
        q_out, kv_out = c.num_attention_heads * self.head_dim, c.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(c.hidden_size, q_out, bias=qkv_bias)
        self.k_proj = ColumnParallelLinear(c.hidden_size, kv_out, bias=qkv_bias)
        self.v_proj = ColumnParallelLinear(c.hidden_size, kv_out, bias=qkv_bias)
        self.o_proj = RowParallelLinear(q_out, c.hidden_size, bias=o_bias)
        self.num_heads = c.num_attention_heads // TP.size  # this rank's heads
        self.num_kv_heads = c.num_key_value_heads // TP.size
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary = Rotary(c, self.head_dim, interleaved_rope)
        # Set by the model runner when it allocates the KV cache; empty = no cache (reference forward).
        self.k_cache = self.v_cache = torch.tensor([])

    def cache_spec(self) -> tuple[int, int, int]:
        """(kv heads on this rank, K dim, V dim) of this layer's paged cache."""
        return self.num_kv_heads, self.head_dim, self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        q, k, v = self.project(x, ctx)
        if self.k_cache.numel() == 0:
            o = self._causal_no_cache(q, k, v, ctx)
        else:
            kernels.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
            if ctx.is_decode:
                o = kernels.decode_attention(
                    q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale
                )
            else:
                o = kernels.prefill_attention(
                    q, self.k_cache, self.v_cache, ctx.block_tables, ctx.cu_seqlens_q,
                    ctx.context_lens, self.scale, ctx.max_seqlen_q,
                )
        return self.o_proj(o.reshape(x.shape[0], -1))

    def project(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, heads, D], k and v [N, kv heads, D]: projected, q/k-normed where the family does, rotated."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = ctx.rope_cos, ctx.rope_sin
        rot = self.rotary
        if cos is None or cos.dtype != rot.cos_sin_dtype(q.dtype) or cos.shape != (n, rot.rotary_dim):
            cos, sin = rot.cos_sin(ctx.positions, q.dtype)  # no cached table (or one for another dtype)
        if self.qk_norm:  # one kernel on CUDA: q/k RMSNorm + rotary
            q, k = qk_norm_rope(q, k, cos, sin, rot.rotary_dim, rot.interleaved,
                                self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        else:
            q, k = qk_norm_rope(q, k, cos, sin, rot.rotary_dim, rot.interleaved)
        return q, k, v

    def _causal_no_cache(self, q, k, v, ctx) -> torch.Tensor:
        """Full-sequence causal attention per sequence of the step (no KV cache)."""
        cu = ctx.cu_seqlens_q.tolist() if ctx.cu_seqlens_q is not None else [0, q.shape[0]]
        outs = []
        for s, e in zip(cu[:-1], cu[1:], strict=True):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
            )
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)
