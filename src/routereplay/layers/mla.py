"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, Moonlight) over a COMPRESSED paged cache.

Per token the cache holds only the normalised KV latent (``kv_lora_rank``) and the rotated shared key part
(``qk_rope_head_dim``): one "kv head" of ``kv_lora_rank + qk_rope_head_dim`` values, no V cache.

* no cache attached (reference forward): the latents are decompressed and each sequence attends causally;
* prefill / mixed steps: each sequence's cached latents are gathered and decompressed through ``kv_b_proj``;
* decode steps: absorbed projections, nothing is decompressed. ``q_nope`` goes through ``W_UK`` into latent
  space, attention runs as MQA over the cached [latent | k_pe] rows, and the latent output goes through
  ``W_UV``. Exact, since ``q_nope . (W_UK c) = (W_UK^T q_nope) . c`` and ``sum_l p_l W_UV c_l = W_UV sum_l p_l c_l``.

With block-FP8 projections the absorbed path uses the dequantized ``kv_b_proj`` and rounds the cached latents
through the same per-token-group e4m3 quantization that ``kv_b_proj``'s FP8 GEMM applies to them when
decompressing, so both paths still compute the same attention.

Both paths are plain PyTorch (the CPU path); there are no Triton kernels for MLA yet. The decode path makes
no host sync (its key length is the block table's width), the prefill path loops over sequences.
Parameter names equal transformers' ``DeepseekV3Attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routereplay.context import get_context
from routereplay.kernels.fp8 import dequantize_block_weight, quantize_per_token_group
from routereplay.kernels.fused import qk_norm_rope
from routereplay.layers.norm import RMSNorm
from routereplay.layers.parallel import TP, ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from routereplay.layers.rotary import Rotary

_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(hf_config) -> float:
    """(qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 for scaled rope (as transformers)."""
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        mscale_all_dim = rope.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = _yarn_mscale(rope["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


class MLAttention(nn.Module):
    graph_safe = False  # the latent-cache write syncs with the host: decode runs eagerly until MLA has GPU kernels

    def __init__(self, hf_config) -> None:
        super().__init__()
        c = hf_config
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank, self.q_rank = c.kv_lora_rank, c.q_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.num_heads = c.num_attention_heads // TP.size  # this rank's heads; the latent cache is replicated
        heads, bias = c.num_attention_heads, getattr(c, "attention_bias", False)
        if self.q_rank is None:
            self.q_proj = ColumnParallelLinear(c.hidden_size, heads * self.qk_dim)
        else:
            self.q_a_proj = ReplicatedLinear(c.hidden_size, self.q_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_rank, _LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_rank, heads * self.qk_dim)
        self.kv_a_proj_with_mqa = ReplicatedLinear(c.hidden_size, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.kv_rank, heads * (self.nope_dim + self.v_dim))
        self.o_proj = RowParallelLinear(heads * self.v_dim, c.hidden_size, bias=bias)
        self.rotary = Rotary(c, self.rope_dim, bool(getattr(c, "rope_interleave", True)))
        self.scale = mla_softmax_scale(c)
        self.k_cache = self.v_cache = torch.tensor([])  # set by the model runner; empty = no cache

    def cache_spec(self) -> tuple[int, int, int]:
        """One latent "head" of [kv latent | rotated k_pe] per token, no V cache."""
        return 1, self.kv_rank + self.rope_dim, 0

    # ---- projections ------------------------------------------------------------------------------
    def _w_kv_b(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, rank] and W_UV [H, v, rank] (views of kv_b_proj's weight, dequantized if FP8)."""
        proj = self.kv_b_proj
        if proj.block is None:
            w = proj.weight.to(dtype)
        else:
            w = dequantize_block_weight(proj.weight, proj.weight_scale_inv, proj.block, dtype)
        w = w.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _as_kv_b_input(self, rows: torch.Tensor) -> torch.Tensor:
        """Cached rows with the latent part as an FP8 kv_b_proj sees it: rounded per token group of block_k."""
        group = self.kv_b_proj.block[1]
        q, s = quantize_per_token_group(rows[..., : self.kv_rank], group)
        latent = q.float() * s.repeat_interleave(group, dim=-1)[..., : self.kv_rank]
        return torch.cat((latent, rows[..., self.kv_rank :]), dim=-1)

    def _decompress(self, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows [L, rank + rope] -> keys [L, H, qk_dim] and values [L, H, v]."""
        latent, k_pe = rows[:, : self.kv_rank].to(dtype), rows[:, self.kv_rank :].to(dtype)
        kv = self.kv_b_proj(latent).view(-1, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(-1, self.num_heads, -1)), dim=-1)
        return k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        n = x.shape[0]
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(n, self.num_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = ctx.rope_cos, ctx.rope_sin
        rot = self.rotary
        if cos is None or cos.dtype != rot.cos_sin_dtype(x.dtype) or cos.shape != (n, rot.rotary_dim):
            cos, sin = rot.cos_sin(ctx.positions, x.dtype)
        q_pe, k_pe = qk_norm_rope(q_pe.contiguous(), k_pe.contiguous().view(n, 1, self.rope_dim), cos, sin,
                                  rot.rotary_dim, rot.interleaved)
        rows = torch.cat((latent, k_pe.view(n, self.rope_dim)), dim=-1)  # what the cache holds per token
        if self.k_cache.numel() == 0:
            o = self._causal_no_cache(q_nope, q_pe, rows, ctx)
        else:
            self._store(rows, ctx.slot_mapping)
            if ctx.is_decode:
                o = self._decode_absorbed(q_nope, q_pe, ctx)
            else:
                o = self._prefill_decompressed(q_nope, q_pe, ctx)
        return self.o_proj(o.reshape(n, self.num_heads * self.v_dim))

    # ---- attention paths --------------------------------------------------------------------------
    def _store(self, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        keep = slot_mapping >= 0
        flat = self.k_cache.view(-1, rows.shape[-1])
        flat[slot_mapping[keep].long()] = rows[keep].to(flat.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        """q [T, H, qk], k [L, H, qk], v [L, H, v]; query i sits at position past + i of the L keys."""
        t, length = q.shape[0], k.shape[0]
        mask = torch.arange(length, device=q.device)[None, :] <= (torch.arange(t, device=q.device) + past)[:, None]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=self.scale
        )
        return o.transpose(0, 1)

    def _causal_no_cache(self, q_nope, q_pe, rows, ctx) -> torch.Tensor:
        q = torch.cat((q_nope, q_pe), dim=-1)
        k, v = self._decompress(rows, q.dtype)
        cu = ctx.cu_seqlens_q.tolist() if ctx.cu_seqlens_q is not None else [0, q.shape[0]]
        return torch.cat([self._attend(q[s:e], k[s:e], v[s:e], 0) for s, e in zip(cu[:-1], cu[1:], strict=True)])

    def _gather(self, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cached rows at ``positions`` ([S, L] with tables [S, W], or [L] with a table [W])."""
        block_size = self.k_cache.shape[1]
        blocks = torch.gather(block_tables.long(), -1, torch.div(positions, block_size, rounding_mode="floor"))
        slots = blocks.clamp_min(0) * block_size + positions % block_size
        return self.k_cache.view(-1, self.k_cache.shape[-1])[slots]

    def _prefill_decompressed(self, q_nope, q_pe, ctx) -> torch.Tensor:
        q = torch.cat((q_nope, q_pe), dim=-1)
        cu, lens = ctx.cu_seqlens_q.tolist(), ctx.context_lens.tolist()
        outs = []
        for s, length in enumerate(lens):
            q0, q1 = cu[s], cu[s + 1]
            rows = self._gather(ctx.block_tables[s], torch.arange(length, device=q.device))
            k, v = self._decompress(rows, q.dtype)
            outs.append(self._attend(q[q0:q1], k, v, length - (q1 - q0)))
        return torch.cat(outs)

    def _decode_absorbed(self, q_nope, q_pe, ctx) -> torch.Tensor:
        """One query per sequence, MQA over the latent cache; math in fp32."""
        b = q_nope.shape[0]
        w_uk, w_uv = self._w_kv_b(torch.float32)
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope.float(), w_uk)  # q_nope absorbed through W_UK
        q_full = torch.cat((q_lat, q_pe.float()), dim=-1)  # [B, H, rank + rope]
        width = ctx.block_tables.shape[1] * self.k_cache.shape[1]  # static bound: no host sync
        pos = torch.arange(width, device=q_nope.device).expand(b, width)
        valid = pos < ctx.context_lens.long()[:, None]
        rows = self._gather(ctx.block_tables, torch.where(valid, pos, 0)).float()  # [B, L, rank + rope]
        if self.kv_b_proj.block is not None:
            rows = self._as_kv_b_input(rows)
        scores = torch.einsum("bhc,blc->bhl", q_full, rows) * self.scale
        probs = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1).nan_to_num_(0.0)
        o_lat = torch.einsum("bhl,blr->bhr", probs, rows[..., : self.kv_rank])
        return torch.einsum("bhr,hvr->bhv", o_lat, w_uv).to(q_nope.dtype)  # out through W_UV
