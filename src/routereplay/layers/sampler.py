"""Batched sampling with per-request temperature, top-k, top-p and seeds.

Randomness is counter-based: the noise for (seed, position, token) is a pure function of those
three numbers, so a seeded request samples the same tokens whatever else is in the batch, after a
preemption and recompute, and inside or outside a CUDA graph.
"""

import torch

_M1 = 0xFF51AFD7ED558CCD - (1 << 64)  # splitmix / murmur3 finaliser constants as signed int64
_M2 = 0xC4CEB9FE1A85EC53 - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def counter_uniform(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, vocab] uniform (0, 1) noise from (seed [S], position [S]), int64 arithmetic that wraps."""
    x = seed[:, None] * _GOLDEN + position[:, None] * _M2
    x = x + torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :] * _M1
    x = (x ^ _srl(x, 33)) * _M1
    x = (x ^ _srl(x, 33)) * _M2
    x = x ^ _srl(x, 33)
    return (_srl(x, 40).float() + 0.5) * (1.0 / (1 << 24))


def _truncated_log_softmax(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """log-probs renormalised over the top-k / top-p set (-inf outside it)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    ranks = torch.arange(vocab, device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token if it is within top-k and the mass before it is below top-p (the first always stays).
    keep = (ranks < k) & ((probs.cumsum(-1) - probs) < top_p[:, None])
    logp_sorted = torch.log_softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.empty_like(logp_sorted).scatter_(1, order, logp_sorted)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, position: torch.Tensor, truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, V] fp32 -> (token ids [S], log-probs [S]) under the distribution sampled from.

    temperature 0 = greedy; top_k <= 0 or >= V = off; top_p 1 = off. `truncate=False` (the caller
    knows no row uses top-k / top-p) skips the vocabulary sort.
    """
    greedy = temperature == 0
    logp_plain = torch.log_softmax(logits, dim=-1)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logp = _truncated_log_softmax(scaled, top_k, top_p) if truncate else torch.log_softmax(scaled, dim=-1)
    vocab = logits.shape[-1]
    gumbel = -torch.log(-torch.log(counter_uniform(seed, position, vocab)))
    sampled = torch.argmax(logp + gumbel, dim=-1)
    tokens = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
    chosen = torch.where(greedy[:, None], logp_plain, logp)
    return tokens, chosen.gather(1, tokens[:, None]).squeeze(1)
