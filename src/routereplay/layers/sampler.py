"""Batched sampling with per-request temperature, top-k, top-p and seeds.

Randomness is counter-based: the noise for (seed, position, token) is a pure function of those
three numbers, so a seeded request samples the same tokens whatever else is in the batch, after a
preemption and recompute, and inside or outside a CUDA graph.
"""

import torch

from routereplay.kernels.fused import counter_uniform, gumbel_sample

__all__ = ["counter_uniform", "sample", "top_logprobs"]


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
    knows no row uses top-k / top-p) skips the vocabulary sort. A row whose distribution is broken (NaN or
    +inf logits, every token masked) gets a non-finite log-prob: the caller must not use its token.
    """
    if not truncate:  # one streaming kernel on CUDA (counter noise + Gumbel-max + log-softmax)
        return gumbel_sample(logits, temperature, seed, position)
    greedy = temperature == 0
    logp_plain = torch.log_softmax(logits, dim=-1)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logp = _truncated_log_softmax(scaled, top_k, top_p)
    vocab = logits.shape[-1]
    gumbel = -torch.log(-torch.log(counter_uniform(seed, position, vocab)))
    sampled = torch.argmax(logp + gumbel, dim=-1)
    tokens = torch.where(greedy, torch.argmax(logits, dim=-1), sampled)
    chosen = torch.where(greedy[:, None], logp_plain, logp)
    return tokens, chosen.gather(1, tokens[:, None]).squeeze(1)


def top_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` most likely tokens of each row under the distribution ``sample`` draws from (and reports
    log-probs of): (log-probs [S, n] descending, token ids [S, n]); -inf marks tokens outside top-k / top-p."""
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logp = torch.where(greedy[:, None], torch.log_softmax(logits, dim=-1), _truncated_log_softmax(scaled, top_k, top_p))
    return logp.topk(min(n, logp.shape[-1]), dim=-1)
