"""Small fused kernels of a decode step: RMSNorm (+ residual add), q/k norm + rotary, and Gumbel-max sampling.

Each Triton kernel sits beside its plain-PyTorch reference; the references are the engine's CPU path and
keep the exact math (and op order) of transformers' layers, so CPU results are bit-identical to the unfused
code. Public functions dispatch: CUDA tensors with Triton importable -> Triton kernel (no host sync, CUDA-graph
capturable), anything else -> the reference.

The Triton kernels reproduce the references' roundings where that is cheap (fp32 statistics, cast back to the
input dtype before the weight, bf16 rounding of each rotary product); the reductions' order differs, so a
GPU result may differ from the reference by an ulp of the output dtype.
"""

from __future__ import annotations

import torch

try:  # optional: CPU builds and CI have no triton
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except Exception:  # pragma: no cover - older triton
        libdevice = None
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    libdevice = None
    HAS_TRITON = False

# Tunables (module level so a benchmark can sweep them).
NORM_MAX_DIM = 32768  # rows longer than this take the reference path
SAMPLE_SPLIT = 4096  # vocabulary columns per program of the sampler (fixed: results never depend on the batch)
SAMPLE_BLOCK = 1024  # columns per inner iteration
SAMPLE_NUM_WARPS = 4

_INT32_MAX = 2**31 - 1


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------
# References (the CPU path of the engine; also what the Triton kernels are tested against)
# ----------------------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: fp32 statistics, cast back to the input dtype, then times the weight."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm_ref(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + delta``; returns ``(h, rms_norm(h))``."""
    h = residual + delta
    return h, rms_norm_ref(h, weight, eps)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
             interleaved: bool) -> torch.Tensor:
    """Rotate ``x [N, H, D]`` by ``cos``/``sin [N, R]`` (from ``Rotary.cos_sin``).

    Half-split (first ``rotary_dim`` dims, the rest passes through; math in x's dtype) or interleaved pairs
    (x0, x1), (x2, x3), ... in fp32 (ERNIE).
    """
    cos, sin = cos[:, None], sin[:, None]
    if interleaved:
        pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return (x.float() * cos + pairs.float() * sin).to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                     interleaved: bool, q_weight: torch.Tensor | None = None,
                     k_weight: torch.Tensor | None = None, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    if q_weight is not None:
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    return rope_ref(q, cos, sin, rotary_dim, interleaved), rope_ref(k, cos, sin, rotary_dim, interleaved)


_M1 = 0xFF51AFD7ED558CCD - (1 << 64)  # splitmix / murmur3 finaliser constants as signed int64
_M2 = 0xC4CEB9FE1A85EC53 - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def counter_uniform(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, vocab] uniform noise in (0, 1) from (seed [S], position [S]), int64 arithmetic that wraps.

    23 random bits: (k + 0.5) / 2**23 is exact in fp32 and stays below 1 (with 24 bits the top value
    rounded to 1.0, whose Gumbel noise is +inf: that token would be sampled whatever its logit).
    """
    x = seed[:, None] * _GOLDEN + position[:, None] * _M2
    x = x + torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :] * _M1
    x = (x ^ _srl(x, 33)) * _M1
    x = (x ^ _srl(x, 33)) * _M2
    x = x ^ _srl(x, 33)
    return (_srl(x, 41).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_sample_ref(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                      position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Untruncated sampling: Gumbel-max over ``log_softmax(logits / T)`` with counter noise; T = 0 is greedy.

    Returns (token ids [S] int64, log-prob of each token [S] fp32: under softmax(logits / T), or the plain
    log_softmax(logits) for greedy rows).
    """
    greedy = temperature == 0
    logp_plain = torch.log_softmax(logits, dim=-1)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    gumbel = -torch.log(-torch.log(counter_uniform(seed, position, logits.shape[-1])))
    sampled = torch.argmax(logp + gumbel, dim=-1)
    tokens = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
    chosen = torch.where(greedy[:, None], logp_plain, logp)
    return tokens, chosen.gather(1, tokens[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, h_ptr, stride_x, stride_d, eps,
                         D: tl.constexpr, BLOCK: tl.constexpr, HAS_ADD: tl.constexpr):
        # One program = one row: optional residual add (rounded to h's dtype, as the reference's add),
        # fp32 statistics, cast back to the row's dtype, then times the weight in the output dtype.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_ADD:
            dl = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + dl.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * D + cols, x, mask=mask)
        xf = x.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        y = (xf * r).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_heads(src, dst, w_ptr, cos_row, sin_row, h0, stride_h, eps,
                         NH: tl.constexpr, HB: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                         ROT: tl.constexpr, HAS_NORM: tl.constexpr, INTERLEAVED: tl.constexpr):
        # HB heads of one token: [HB, D_PAD] tile. The rotation partner of each element is loaded a second
        # time (cheap, from L1) instead of shuffling registers.
        dt = src.dtype.element_ty
        h = h0 + tl.arange(0, HB)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        d_mask = d < D
        r_mask = d < ROT
        mask = (h < NH) & d_mask
        if INTERLEAVED:  # (x0, x1), (x2, x3), ...: out[2i] = x[2i] c - x[2i+1] s, out[2i+1] = x[2i+1] c + x[2i] s
            partner = d ^ 1
            neg = (d % 2) == 0
        else:  # halves: out[i] = x[i] c - x[i+R/2] s, out[i+R/2] = x[i+R/2] c + x[i] s
            partner = tl.where(d < ROT // 2, d + ROT // 2, d - ROT // 2)
            neg = d < ROT // 2
        x = tl.load(src + h * stride_h + d, mask=mask, other=0.0)
        xp = tl.load(src + h * stride_h + partner, mask=mask & r_mask, other=0.0)
        if HAS_NORM:
            xf = x.to(tl.float32)
            r = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
            w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
            wp = tl.load(w_ptr + partner, mask=r_mask, other=0.0).to(tl.float32)
            x = (w * (xf * r).to(dt).to(tl.float32)).to(dt)
            xp = (wp * (xp.to(tl.float32) * r).to(dt).to(tl.float32)).to(dt)
        c = tl.load(cos_row + d, mask=r_mask, other=0.0).to(tl.float32)
        s = tl.load(sin_row + d, mask=r_mask, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        xpf = tl.where(neg, -xp.to(tl.float32), xp.to(tl.float32))
        if INTERLEAVED:  # fp32 math, one rounding at the end
            rot = xf * c + xpf * s
        else:  # math in the model dtype: each product rounded, then the sum
            rot = (xf * c).to(dt).to(tl.float32) + (xpf * s).to(dt).to(tl.float32)
        out = tl.where(r_mask, rot, xf).to(dt)
        tl.store(dst + h * D + d, out, mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, eps,
                             stride_qn, stride_qh, stride_kn, stride_kh, stride_cn,
                             HQ: tl.constexpr, HK: tl.constexpr, Q_BLOCKS: tl.constexpr, HB: tl.constexpr,
                             D: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr,
                             HAS_NORM: tl.constexpr, INTERLEAVED: tl.constexpr):
        # Grid (tokens, q head blocks + k head blocks): q and k in one launch.
        n = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        cos_row = cos_ptr + n * stride_cn
        sin_row = sin_ptr + n * stride_cn
        if blk < Q_BLOCKS:
            _norm_rope_heads(q_ptr + n * stride_qn, qo_ptr + n * (HQ * D), qw_ptr, cos_row, sin_row, blk * HB,
                             stride_qh, eps, HQ, HB, D, D_PAD, ROT, HAS_NORM, INTERLEAVED)
        else:
            _norm_rope_heads(k_ptr + n * stride_kn, ko_ptr + n * (HK * D), kw_ptr, cos_row, sin_row,
                             (blk - Q_BLOCKS) * HB, stride_kh, eps, HK, HB, D, D_PAD, ROT, HAS_NORM, INTERLEAVED)

    @triton.jit
    def _gumbel_split_kernel(logits_ptr, temp_ptr, seed_ptr, pos_ptr, part_f_ptr, part_i_ptr, stride_l, V,
                             NSPLIT: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                             PRECISE_LOG: tl.constexpr):
        # Grid (rows, vocabulary splits). Each program streams SPLIT columns once: per lane, the best
        # scaled + gumbel value (first column wins ties) and an online (max, sum exp) for the log-softmax.
        row = tl.program_id(0)
        sp = tl.program_id(1)
        t = tl.load(temp_ptr + row)
        greedy = t == 0.0
        div = tl.zeros([BLOCK], tl.float32) + tl.where(greedy, 1.0, t)  # div_rn does not broadcast
        # counter_uniform in uint64: multiplications wrap mod 2**64 like int64, and >> is logical.
        seed = tl.load(seed_ptr + row).to(tl.uint64, bitcast=True)
        pos = tl.load(pos_ptr + row).to(tl.uint64, bitcast=True)
        base = seed * 0x9E3779B97F4A7C15 + pos * 0xC4CEB9FE1A85EC53
        lane = tl.arange(0, BLOCK)
        best_v = tl.full([BLOCK], float("-inf"), tl.float32)
        best_s = tl.full([BLOCK], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK], 2147483647, tl.int32)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        lsum = tl.zeros([BLOCK], tl.float32)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_l
        start = sp * SPLIT
        for c0 in range(start, start + SPLIT, BLOCK):
            cols = c0 + lane
            mask = cols < V
            s = tl.math.div_rn(tl.load(row_ptr + cols, mask=mask, other=float("-inf")), div)
            m_new = tl.maximum(m, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            lsum = lsum * tl.exp(m - m_safe) + tl.exp(s - m_safe)
            m = m_new
            x = base + cols.to(tl.uint64) * 0xFF51AFD7ED558CCD
            x = (x ^ (x >> 33)) * 0xFF51AFD7ED558CCD
            x = (x ^ (x >> 33)) * 0xC4CEB9FE1A85EC53
            x = x ^ (x >> 33)
            u = ((x >> 41).to(tl.float32) + 0.5) * (1.0 / 8388608)
            if PRECISE_LOG:  # libdevice logf = torch's CUDA log
                g = -libdevice.log(-libdevice.log(u))
            else:
                g = -tl.log(-tl.log(u))
            v = tl.where(greedy, s, s + g)
            v = tl.where(mask, v, float("-inf"))
            upd = v > best_v
            best_v = tl.where(upd, v, best_v)
            best_s = tl.where(upd, s, best_s)
            best_i = tl.where(upd, cols, best_i)
        bv = tl.max(best_v, 0)
        bi = tl.min(tl.where(best_v == bv, best_i, 2147483647), 0)
        bs = tl.max(tl.where(best_i == bi, best_s, float("-inf")), 0)
        mm = tl.max(m, 0)
        mm_safe = tl.where(mm == float("-inf"), 0.0, mm)
        ll = tl.sum(lsum * tl.exp(m - mm_safe), 0)
        out = row * NSPLIT + sp
        tl.store(part_f_ptr + out * 4, bv)
        tl.store(part_f_ptr + out * 4 + 1, bs)
        tl.store(part_f_ptr + out * 4 + 2, mm)
        tl.store(part_f_ptr + out * 4 + 3, ll)
        tl.store(part_i_ptr + out, bi)

    @triton.jit
    def _gumbel_reduce_kernel(part_f_ptr, part_i_ptr, tok_ptr, lp_ptr,
                              NSPLIT: tl.constexpr, NS_PAD: tl.constexpr):
        row = tl.program_id(0)
        sp = tl.arange(0, NS_PAD)
        mask = sp < NSPLIT
        p = row * NSPLIT + sp
        bv = tl.load(part_f_ptr + p * 4, mask=mask, other=float("-inf"))
        bs = tl.load(part_f_ptr + p * 4 + 1, mask=mask, other=float("-inf"))
        m = tl.load(part_f_ptr + p * 4 + 2, mask=mask, other=float("-inf"))
        lsum = tl.load(part_f_ptr + p * 4 + 3, mask=mask, other=0.0)
        bi = tl.load(part_i_ptr + p, mask=mask, other=2147483647)
        best = tl.max(bv, 0)
        idx = tl.min(tl.where(bv == best, bi, 2147483647), 0)
        s_best = tl.max(tl.where(bi == idx, bs, float("-inf")), 0)
        mm = tl.max(m, 0)
        mm = tl.where(mm == float("-inf"), 0.0, mm)
        lse = mm + tl.log(tl.sum(lsum * tl.exp(m - mm), 0))
        tl.store(tok_ptr + row, tl.where(idx == 2147483647, 0, idx).to(tl.int64))
        tl.store(lp_ptr + row, s_best - lse)


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    d2 = delta.reshape(-1, D) if delta is not None else x2
    assert x2.stride(-1) == 1 and d2.stride(-1) == 1 and weight.is_contiguous()
    h_dtype = torch.promote_types(x.dtype, delta.dtype) if delta is not None else x.dtype
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, h_dtype), device=x.device)
    h = torch.empty(x2.shape, dtype=h_dtype, device=x.device) if delta is not None else out
    M = x2.shape[0]
    if M:
        block = _next_pow2(D)
        _rms_norm_kernel[(M,)](x2, d2, weight, out, h, x2.stride(0), d2.stride(0), eps, D=D, BLOCK=block,
                               HAS_ADD=delta is not None, num_warps=min(16, max(1, block // 512)))
    out = out.view(x.shape)
    return out if delta is None else (h.view(x.shape), out)


def _qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         rotary_dim: int, interleaved: bool, q_weight: torch.Tensor | None,
                         k_weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    N, HQ, D = q.shape
    HK = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    qo = torch.empty(N, HQ, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(N, HK, D, dtype=k.dtype, device=k.device)
    if N == 0:
        return qo, ko
    d_pad = _next_pow2(D)
    hb = max(1, min(_next_pow2(min(HQ, HK)), 4096 // d_pad))
    q_blocks = triton.cdiv(HQ, hb)
    has_norm = q_weight is not None
    _qk_norm_rope_kernel[(N, q_blocks + triton.cdiv(HK, hb))](
        q, k, qo, ko, q_weight if has_norm else q, k_weight if has_norm else k, cos, sin, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HQ=HQ, HK=HK, Q_BLOCKS=q_blocks, HB=hb, D=D, D_PAD=d_pad, ROT=rotary_dim if not interleaved else cos.shape[1],
        HAS_NORM=has_norm, INTERLEAVED=interleaved, num_warps=4 if hb * d_pad >= 2048 else 2,
        # No contraction: the compiler narrows the rounded fp32 products to bf16 ops and would fuse them into
        # fma.rn.bf16 (one rounding instead of the reference's two).
        enable_fp_fusion=False)
    return qo, ko


def _gumbel_sample_triton(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                          position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    S, V = logits.shape
    assert logits.stride(1) == 1 and logits.dtype == torch.float32
    tokens = torch.empty(S, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(S, dtype=torch.float32, device=logits.device)
    if S == 0:
        return tokens, logprobs
    split = max(SAMPLE_BLOCK, SAMPLE_SPLIT // SAMPLE_BLOCK * SAMPLE_BLOCK)
    nsplit = triton.cdiv(V, split)
    part_f = torch.empty(S * nsplit * 4, dtype=torch.float32, device=logits.device)
    part_i = torch.empty(S * nsplit, dtype=torch.int32, device=logits.device)
    _gumbel_split_kernel[(S, nsplit)](
        logits, temperature.float().contiguous(), seed.long().contiguous(), position.long().contiguous(),
        part_f, part_i, logits.stride(0), V, NSPLIT=nsplit, SPLIT=split, BLOCK=SAMPLE_BLOCK,
        PRECISE_LOG=logits.is_cuda and libdevice is not None, num_warps=SAMPLE_NUM_WARPS)
    _gumbel_reduce_kernel[(S,)](part_f, part_i, tokens, logprobs, NSPLIT=nsplit, NS_PAD=_next_pow2(nsplit),
                                num_warps=1)
    return tokens, logprobs


# ----------------------------------------------------------------------------------------------------------
# Public API (dispatching)
# ----------------------------------------------------------------------------------------------------------


def _norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _use_triton(x) and x.shape[-1] <= NORM_MAX_DIM and weight.shape == x.shape[-1:] and weight.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``; output dtype = promote(weight, x), like the reference."""
    if _norm_fits(x, weight):
        return _rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + delta``; returns ``(h, rms_norm(h))`` (one kernel on CUDA)."""
    if _norm_fits(residual, weight) and delta.shape == residual.shape:
        return _rms_norm_triton(residual, weight, eps, delta=delta)
    return add_rms_norm_ref(residual, delta, weight, eps)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                 interleaved: bool, q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm (q/k norm) then rotary, for ``q [N, Hq, D]`` and ``k [N, Hk, D]`` at once.

    ``cos``/``sin [N, R]`` come from ``Rotary.cos_sin``: in q's dtype for half-split, fp32 for interleaved.
    """
    rope_dtype = torch.float32 if interleaved else q.dtype
    fits = (_use_triton(q) and k.dtype == q.dtype and cos.dtype == rope_dtype and sin.dtype == rope_dtype
            and cos.dim() == 2 and cos.shape == sin.shape and cos.shape[0] == q.shape[0]
            and cos.shape[1] == (q.shape[2] if interleaved else rotary_dim) and q.shape[2] == k.shape[2]
            and (q_weight is None or (q_weight.dtype == q.dtype and k_weight.dtype == q.dtype)))
    if fits:
        return _qk_norm_rope_triton(q, k, cos.contiguous(), sin.contiguous(), rotary_dim, interleaved,
                                    q_weight, k_weight, eps)
    return qk_norm_rope_ref(q, k, cos, sin, rotary_dim, interleaved, q_weight, k_weight, eps)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                  position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Untruncated sampling (see ``gumbel_sample_ref``); on CUDA one streaming pass over the vocabulary.

    The CUDA path draws the same noise as ``counter_uniform`` bit for bit and picks the argmax of
    ``logits / T + gumbel`` (the reference adds the noise to the log-softmax instead: equal up to rounding);
    each row's result depends on that row only, never on the rest of the batch.
    """
    if _use_triton(logits) and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1:
        return _gumbel_sample_triton(logits, temperature, seed, position)
    return gumbel_sample_ref(logits, temperature, seed, position)
