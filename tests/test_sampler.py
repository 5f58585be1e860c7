"""The sampler: truncation, seeds, and the log-prob of the distribution sampled from."""

import torch

from routereplay.layers.sampler import counter_uniform, sample, top_logprobs


def _args(s, v, temperature=1.0, top_k=-1, top_p=1.0, seed=0):
    return (torch.full((s,), float(temperature)), torch.full((s,), top_k), torch.full((s,), float(top_p)),
            torch.full((s,), seed, dtype=torch.long), torch.arange(s, dtype=torch.long))


def test_top_k_and_top_p_restrict_the_support_and_renormalise():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    t, k, p, seed, pos = _args(64, 50, top_k=5)
    tokens, logprobs = sample(logits, t, k, p, seed, pos)
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == tokens[:, None]).any(-1).all()
    expected = torch.log_softmax(logits.gather(1, top5), -1)
    got = expected.gather(1, (top5 == tokens[:, None]).float().argmax(-1, keepdim=True)).squeeze(1)
    assert torch.allclose(logprobs, got, atol=1e-5)
    t, k, p, seed, pos = _args(64, 50, top_p=1e-6)  # nucleus of one token = greedy, log-prob 0
    tokens, logprobs = sample(logits, t, k, p, seed, pos)
    assert torch.equal(tokens, logits.argmax(-1)) and torch.allclose(logprobs, torch.zeros(64))


def test_untruncated_fast_path_equals_full_path():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(1))
    args = _args(8, 300, temperature=0.7, seed=5)
    a = sample(logits, *args, truncate=True)
    b = sample(logits, *args, truncate=False)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


def test_top_logprobs_follow_the_distribution_sampled_from():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    temperature, top_k, top_p = torch.tensor([0.0, 0.7, 1.3]), torch.tensor([-1, 3, -1]), torch.tensor([1.0, 1.0, 0.9])
    lps, ids = top_logprobs(logits, temperature, top_k, top_p, 5)
    greedy = torch.log_softmax(logits[0], -1).topk(5)  # greedy: the plain log-softmax
    assert torch.equal(ids[0], greedy.indices) and torch.allclose(lps[0], greedy.values)
    top3 = logits[1].topk(3).indices  # top-k 3: renormalised over three tokens, -inf beyond
    assert torch.equal(ids[1, :3], top3) and torch.allclose(lps[1, :3], torch.log_softmax(logits[1, top3] / 0.7, -1))
    assert torch.isinf(lps[1, 3:]).all()
    probs = torch.softmax(logits[2] / 1.3, -1).sort(descending=True).values  # top-p 0.9 over temperature 1.3
    kept = int(((probs.cumsum(-1) - probs) < 0.9).sum())
    assert torch.allclose(lps[2].exp()[: min(kept, 5)], probs[: min(kept, 5)] / probs[:kept].sum())
    seed, pos = torch.zeros(3, dtype=torch.long), torch.arange(3)
    tokens, chosen = sample(logits, temperature, top_k, top_p, seed, pos)
    for r in range(3):  # the sampled token's log-prob is the same number in both places
        hit = (ids[r] == tokens[r]).nonzero()
        if len(hit):
            assert torch.allclose(lps[r, hit[0, 0]], chosen[r], atol=1e-6)


def test_counter_noise_is_a_function_of_seed_position_token():
    u = counter_uniform(torch.tensor([1, 1, 2]), torch.tensor([7, 8, 7]), 1000)
    assert torch.equal(u[0], counter_uniform(torch.tensor([1]), torch.tensor([7]), 1000)[0])
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4000, 3).contiguous()
    t, k, p, _, _ = _args(4000, 3)
    tokens, _ = sample(logits, t, k, p, torch.arange(4000), torch.zeros(4000, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
