"""GPT-OSS layers: attention with learned sinks and sliding windows, biased router, clamped-SwiGLU experts.

Attention is plain PyTorch on every device (no Triton kernel has sinks or windows yet). The decode path
is vectorised with shapes that depend only on the block table's width, so it makes no host sync and can
be captured in a CUDA graph; prefill / mixed steps loop over the step's sequences.

Parameter names and layouts equal transformers' runtime ``GptOssForCausalLM`` (experts fused as
``gate_up_proj [E, H, 2I]`` with gate/up columns interleaved, ``down_proj [E, I, H]``, plus biases), so a
checkpoint written by ``save_pretrained`` and a trainer's ``named_parameters()`` copy in 1:1.
"""

import torch
import torch.nn.functional as F
from torch import nn

from routereplay import kernels
from routereplay.context import get_context
from routereplay.kernels.attention import _gather_slots
from routereplay.layers.attention import Attention
from routereplay.layers.parallel import TP, all_reduce, mark


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention whose denominator also holds one learned logit per head (the sink), in fp32.

    q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hkv, D]``, visible ``[B, Lq, Lk]`` bool -> ``[B, Lq, Hq, D]`` in q's dtype.
    A query that sees no key gets zeros (all its mass is on the sink).
    """
    B, Lq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qg = q.float().view(B, Lq, Hkv, G, D)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.float()) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    sink = sinks.float().view(1, Hkv, G, 1, 1).expand(B, Hkv, G, Lq, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    o = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float())
    return o.reshape(B, Lq, Hq, D).to(q.dtype)


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[..., Lq, Lk]``: causal, and within the last ``window`` positions (self included) when windowed."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    ok = diff >= 0
    if window is not None:
        ok &= diff < window
    return ok


class GptOssAttention(Attention):
    """Attention with q/k/v/o biases, one learned sink logit per head and, on sliding layers, a window."""

    def __init__(self, hf_config, layer_idx: int) -> None:
        c = hf_config
        bias = getattr(c, "attention_bias", True)
        super().__init__(c, qkv_bias=bias, o_bias=bias, qk_norm=False, interleaved_rope=False)
        self.sinks = mark(nn.Parameter(torch.empty(self.num_heads)), 0)  # this rank's heads
        layer_types = getattr(c, "layer_types", None)
        sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        self.window: int | None = c.sliding_window if sliding and c.sliding_window else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        q, k, v = self.project(x, ctx)
        if self.k_cache.numel() == 0:
            o = self._no_cache(q, k, v, ctx)
        else:
            kernels.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
            o = self._decode(q, ctx) if ctx.is_decode else self._prefill(q, ctx)
        return self.o_proj(o.reshape(x.shape[0], -1))

    def _no_cache(self, q, k, v, ctx) -> torch.Tensor:
        """Full-sequence causal (windowed) attention per sequence of the step."""
        cu = ctx.cu_seqlens_q.tolist() if ctx.cu_seqlens_q is not None else [0, q.shape[0]]
        outs = []
        for s, e in zip(cu[:-1], cu[1:], strict=True):
            pos = torch.arange(e - s, device=q.device)
            vis = visible_mask(pos, pos, self.window)[None]
            outs.append(sink_attention(q[None, s:e], k[None, s:e], v[None, s:e], self.sinks, vis, self.scale)[0])
        return torch.cat(outs)

    def _gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hkv, d = self.num_kv_heads, self.head_dim
        return self.k_cache.view(-1, hkv, d)[slots], self.v_cache.view(-1, hkv, d)[slots]

    def _decode(self, q, ctx) -> torch.Tensor:
        """One query per sequence; static shapes (block-table width), no host sync: CUDA-graph safe."""
        block_size = self.k_cache.shape[1]
        tables = ctx.block_tables
        B = q.shape[0]
        lens = ctx.context_lens.long()
        span = tables.shape[1] * block_size
        if self.window is not None:  # only the last `window` positions can be seen
            span = min(span, self.window)
            start = (lens - span).clamp_min(0)
        else:
            start = torch.zeros_like(lens)
        k_pos = start[:, None] + torch.arange(span, device=q.device)[None, :]  # [B, span]
        vis = visible_mask((lens - 1)[:, None], k_pos, self.window)  # [B, 1, span]
        slots = _gather_slots(tables, torch.where(vis[:, 0], k_pos, 0), block_size)
        k, v = self._gather(slots)
        return sink_attention(q.view(B, 1, *q.shape[1:]), k, v, self.sinks, vis, self.scale)[:, 0]

    def _prefill(self, q, ctx) -> torch.Tensor:
        """The step's new tokens of each sequence against that sequence's cached context."""
        block_size = self.k_cache.shape[1]
        cu = ctx.cu_seqlens_q.tolist()
        lens = ctx.context_lens.tolist()
        out = torch.empty_like(q)
        for s, total in enumerate(lens):
            q0, q1 = cu[s], cu[s + 1]
            if q1 == q0:
                continue
            q_pos = torch.arange(total - (q1 - q0), total, device=q.device)
            first = 0 if self.window is None else max(0, total - (q1 - q0) - self.window + 1)
            k_pos = torch.arange(first, total, device=q.device)
            k, v = self._gather(_gather_slots(ctx.block_tables[s], k_pos, block_size))
            vis = visible_mask(q_pos, k_pos, self.window)[None]
            out[q0:q1] = sink_attention(q[None, q0:q1], k[None], v[None], self.sinks, vis, self.scale)[0]
        return out


class GptOssRouter(nn.Module):
    """Linear with bias; top-k over the logits, then softmax over the k selected logits."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight, self.bias)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return ids, torch.softmax(top, dim=-1, dtype=top.dtype).float()


class GptOssExperts(nn.Module):
    """Clamped SwiGLU experts with biases: ``(clamp(up) + 1) * g * sigmoid(alpha * g)``, g = clamp(gate, max).

    Tensor parallelism splits every expert's intermediate dimension, as for the other families; with
    gate/up columns interleaved, a rank's slice is one contiguous run of columns. Rank 0 alone adds
    the down-projection bias, so the all-reduce adds it once.
    """

    def __init__(self, hf_config) -> None:
        super().__init__()
        c = hf_config
        E, H, inter = c.num_local_experts, c.hidden_size, c.intermediate_size // TP.size
        # columns: gate0, up0, gate1, up1, ...
        self.gate_up_proj = mark(nn.Parameter(torch.empty(E, H, 2 * inter)), 2)
        self.gate_up_proj_bias = mark(nn.Parameter(torch.empty(E, 2 * inter)), 1)
        self.down_proj = mark(nn.Parameter(torch.empty(E, inter, H)), 1)
        self.down_proj_bias = nn.Parameter(torch.empty(E, H))
        # configs written by transformers 5.17 lack both fields: its experts fixed them at 1.702 and 7.0
        self.alpha, self.limit = getattr(c, "swiglu_alpha", 1.702), getattr(c, "swiglu_limit", 7.0)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate = gate_up[:, 0::2].clamp(max=self.limit)
        up = gate_up[:, 1::2].clamp(min=-self.limit, max=self.limit)
        act = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        y = act @ self.down_proj[e]
        return y + self.down_proj_bias[e] if TP.rank == 0 else y

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Loop over the experts present; while a CUDA graph is captured (no host sync allowed), every
        expert runs on every token and unselected pairs get weight 0 (correct, slow for big batches)."""
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            out = self._dense(x, ids, weights)
        else:
            out = self._sparse(x, ids, weights)
        # partial sums in fp32 under tensor parallelism, rounded once (see RowParallelLinear)
        return out if TP.size == 1 else all_reduce(out).to(x.dtype)

    def _sparse(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=x.dtype if TP.size == 1 else torch.float32, device=x.device)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        k = ids.shape[1]
        start = 0
        for e, cnt in enumerate(counts):
            if cnt == 0:
                continue
            pairs = order[start : start + cnt]
            start += cnt
            tok = pairs // k
            y = self.expert(e, x[tok]) * weights.reshape(-1)[pairs, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _dense(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_experts = self.gate_up_proj.shape[0]
        combine = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
        combine.scatter_(1, ids, weights.float())
        out = torch.zeros(x.shape, dtype=x.dtype if TP.size == 1 else torch.float32, device=x.device)
        for e in range(num_experts):
            out += (self.expert(e, x) * combine[:, e, None]).to(out.dtype)
        return out
