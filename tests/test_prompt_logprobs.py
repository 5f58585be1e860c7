"""Prompt log-probs (vLLM's SamplingParams.prompt_logprobs) on CPU, fp32: equal to transformers' full-forward
log-softmax under every scheduler path, exact top-N entries, routing rows untouched."""

import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from routereplay.engine import model_runner
from tests.helpers import tiny_checkpoint
from tests.test_engine import prompts

DEBUG = {"enable": True, "debug": True}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("prompt_logprobs_ckpts")), "qwen3_moe")


@pytest.fixture(scope="module")
def ref(qwen):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32).eval()


def ref_logp(ref, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the prompt's logits [P, V]: row t - 1 scores prompt token t."""
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)


def assert_prompt_logprobs(ref, prompt: list[int], got, n_top: int, atol: float = 1e-4) -> None:
    """vLLM's layout: one entry per prompt token, the first None; entry t = {token t: log-prob, then the top
    n_top}, equal to the full forward; a token among the top N is one entry (its own value)."""
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    logp = ref_logp(ref, prompt)
    for t in range(1, len(prompt)):
        entry, tok = got[t], prompt[t]
        assert next(iter(entry)) == tok, "the prompt token comes first"
        assert abs(entry[tok] - logp[t - 1, tok].item()) <= atol, (t, entry[tok], logp[t - 1, tok].item())
        if n_top == 0:
            assert len(entry) == 1
            continue
        expected = logp[t - 1].topk(n_top).values
        values = list(entry.values())
        if len(entry) == n_top + 1:  # the token is not among the top N: they follow it, most likely first
            tops = values[1:]
            assert tops == sorted(tops, reverse=True) and entry[tok] <= min(tops)
        else:  # it is: one entry (its own value), the others follow it
            assert len(entry) == n_top
            tops = sorted(values, reverse=True)
            assert values[1:] == sorted(values[1:], reverse=True)
        assert torch.allclose(torch.tensor(tops), expected, atol=atol), (t, tops, expected)


def greedy_prompt(llm: LLM, prefix: list[int], k: int = 6) -> list[int]:
    """prefix + the model's own greedy continuation: at those positions the prompt token is the argmax."""
    out = llm.generate(prompt_token_ids=[prefix], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
    return prefix + out[0].outputs[0].token_ids


def test_equal_full_forward_and_top_n_exact(qwen, ref):
    llm = LLM(qwen, max_model_len=256, block_size=8)
    ps = prompts(6, seed=11, lo=2, hi=40)
    ps[0] = greedy_prompt(llm, ps[0])
    for n_top in (0, 1, 5, 20):
        sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=n_top, ignore_eos=True)
        outs = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
        for p, o in zip(ps, outs, strict=True):
            assert_prompt_logprobs(ref, p, o.prompt_logprobs, n_top)
            assert o.num_cached_tokens == 0  # a prompt_logprobs request does not read the prefix cache
    # lm-eval's is_greedy: the token's log-prob == max(top.values()) EXACTLY where the prompt is greedy
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    got = llm.generate(prompt_token_ids=[ps[0]], sampling_params=sp, use_tqdm=False)[0].prompt_logprobs
    greedy_from = len(ps[0]) - 6
    for t in range(greedy_from, len(ps[0])):
        entry = got[t]
        assert len(entry) == 1 and entry[ps[0][t]] == max(entry.values())
    assert any(len(e) == 2 for e in got[1:]), "some prompt token is not the argmax"
    for e in got[1:]:
        if len(e) == 2:  # the top token's value is no smaller than the prompt token's
            tok, lp = next(iter(e.items()))
            assert max(e.values()) >= lp and max(e, key=e.get) != tok


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(enable_prefix_caching=False),
        dict(max_num_batched_tokens=7),  # chunked prefill: positions spread over steps
        dict(num_kv_blocks=12),  # preemption and recompute
        dict(max_num_seqs=3, max_num_batched_tokens=9, num_kv_blocks=14),
    ],
    ids=["no-prefix-cache", "chunked-prefill", "preemption", "all-constraints"],
)
def test_scheduler_paths(qwen, ref, kwargs):
    llm = LLM(qwen, max_model_len=256, block_size=8, **kwargs)
    ps = prompts(10, seed=5, lo=2, hi=45)
    sps = [SamplingParams(temperature=0, max_tokens=4 + i % 5, ignore_eos=True,
                          prompt_logprobs=None if i % 3 == 2 else i % 4) for i in range(len(ps))]
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)
    for p, sp, o in zip(ps, sps, outs, strict=True):
        if sp.prompt_logprobs is None:
            assert o.prompt_logprobs is None
        else:
            assert_prompt_logprobs(ref, p, o.prompt_logprobs, sp.prompt_logprobs)
    if kwargs.get("num_kv_blocks") == 12:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_is_bypassed_and_still_filled(qwen, ref):
    llm = LLM(qwen, max_model_len=256, block_size=4)
    p = prompts(1, seed=2, lo=30, hi=31)[0]
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    asks = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    first = llm.generate(prompt_token_ids=[p], sampling_params=plain, use_tqdm=False)[0]
    o = llm.generate(prompt_token_ids=[p], sampling_params=asks, use_tqdm=False)[0]  # its prefix is cached
    assert o.num_cached_tokens == 0
    assert_prompt_logprobs(ref, p, o.prompt_logprobs, 2)
    assert o.outputs[0].token_ids == first.outputs[0].token_ids
    # a longer prompt sharing it: its prompt log-probs cover the shared part too
    longer = p + [5, 6, 7, 8, 9]
    o2 = llm.generate(prompt_token_ids=[longer], sampling_params=asks, use_tqdm=False)[0]
    assert o2.num_cached_tokens == 0
    assert_prompt_logprobs(ref, longer, o2.prompt_logprobs, 2)
    # the prompt_logprobs request's blocks were committed: a plain request reads them
    again = llm.generate(prompt_token_ids=[longer], sampling_params=plain, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0


def test_n_samples_share_one_computation(qwen, ref):
    llm = LLM(qwen, max_model_len=256, block_size=4, max_num_batched_tokens=11)
    eng = llm.engine
    p = prompts(1, seed=9, lo=26, hi=27)[0]
    sp = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True, prompt_logprobs=3)
    rid = eng.add_request(p, sp)
    seqs = eng.requests[rid].seqs
    done = []
    while not done:
        done += eng.step()
    o = done[0]
    assert len(o.outputs) == 3
    assert_prompt_logprobs(ref, p, o.prompt_logprobs, 3)
    assert o.num_cached_tokens == 0 and seqs[0].prompt_logprobs is o.prompt_logprobs
    for s in seqs[1:]:  # computed once: the other samples read sample 0's cached prompt
        assert s.prompt_logprobs == [None] and s.num_cached_prompt_tokens > 0


def test_recompute_after_preemption_does_not_double_append(qwen, ref):
    """Preempted mid-prefill (positions already scored are skipped) and again while decoding."""
    llm = LLM(qwen, max_model_len=256, block_size=4, max_num_batched_tokens=6)
    eng = llm.engine
    p = prompts(1, seed=4, lo=23, hi=24)[0]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=4)
    rid = eng.add_request(p, sp)
    seq = eng.requests[rid].seqs[0]
    done = []
    for k in range(40):
        done += eng.step()
        if k in (1, 2, 6):  # in prefill (twice), then decoding
            eng.retract()
        if done:
            break
    assert eng.scheduler.num_preemptions == 3
    assert len(seq.prompt_logprobs) == len(p)
    assert_prompt_logprobs(ref, p, done[0].prompt_logprobs, 4)
    plain = llm.generate(prompt_token_ids=[p], use_tqdm=False,
                         sampling_params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert done[0].outputs[0].token_ids == plain.outputs[0].token_ids


def test_logits_in_pieces(qwen, ref, monkeypatch):
    """Long prompts reduce their logits a few rows at a time."""
    monkeypatch.setattr(model_runner, "PROMPT_LOGITS_ELEMENTS", 3 * 128)  # 3 rows of the 128-token vocabulary
    llm = LLM(qwen, max_model_len=256, block_size=8)
    ps = prompts(3, seed=6, lo=20, hi=60)
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)
    for p, o in zip(ps, llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False), strict=True):
        assert_prompt_logprobs(ref, p, o.prompt_logprobs, 5)


def test_raw_logits_no_temperature_or_penalties(qwen):
    """vLLM V1: prompt log-probs come from the raw logits, whatever the sampling settings."""
    llm = LLM(qwen, max_model_len=256, block_size=8)
    p = prompts(1, seed=8, lo=15, hi=16)[0]
    base = llm.generate(prompt_token_ids=[p], use_tqdm=False,
                        sampling_params=SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0]
    other = llm.generate(prompt_token_ids=[p], use_tqdm=False, sampling_params=SamplingParams(
        temperature=0.3, top_k=5, top_p=0.5, repetition_penalty=1.5, presence_penalty=1.0, seed=1, max_tokens=1,
        prompt_logprobs=3))[0]
    assert other.prompt_logprobs == base.prompt_logprobs


@pytest.mark.parametrize("caching", [True, False])
def test_routing_rows_stay_positions(qwen, caching):
    llm = LLM(qwen, max_model_len=256, block_size=4, max_num_batched_tokens=10, routing_replay=DEBUG,
              enable_prefix_caching=caching)
    ps = prompts(5, seed=3, lo=2, hi=30)
    ps = ps + [ps[1] + [9, 10, 11]]  # shares a cached prefix with ps[1]
    sps = [SamplingParams(temperature=1.0, seed=i, n=1 + (i == 2), max_tokens=3, ignore_eos=True,
                          prompt_logprobs=1 if i % 2 == 0 or i == 5 else None) for i in range(len(ps))]
    for _ in range(2):  # the second round has prefix-cache hits for the plain requests
        outs = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)
        for o, sp in zip(outs, sps, strict=True):
            assert (o.prompt_logprobs is None) == (sp.prompt_logprobs is None)
            for c in o.outputs:
                n = len(o.prompt_token_ids) + len(c.token_ids)
                assert np.array_equal(c.routed_experts, np.broadcast_to(np.arange(n - 1)[:, None, None],
                                                                        c.routed_experts.shape))


def test_off_leaves_outputs_unchanged(qwen):
    llm = LLM(qwen, max_model_len=256, block_size=8, enable_prefix_caching=False)
    ps = prompts(4, seed=12)
    sp = SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True, top_logprobs=2)
    off = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    sp_on = SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True, top_logprobs=2, prompt_logprobs=2)
    on = llm.generate(prompt_token_ids=ps, sampling_params=sp_on, use_tqdm=False)
    for a, b in zip(off, on, strict=True):
        assert a.prompt_logprobs is None and b.prompt_logprobs is not None
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]
        assert [c.top_logprobs for c in a.outputs] == [c.top_logprobs for c in b.outputs]


def test_one_token_prompt_and_abort(qwen):
    llm = LLM(qwen, max_model_len=256, block_size=4, max_num_batched_tokens=5)
    o = llm.generate(prompt_token_ids=[[7]], use_tqdm=False,
                     sampling_params=SamplingParams(max_tokens=2, prompt_logprobs=3))[0]
    assert o.prompt_logprobs == [None]
    eng = llm.engine
    rid = eng.add_request(list(range(3, 23)), SamplingParams(max_tokens=2, prompt_logprobs=1))
    eng.step()  # 5 of 20 prompt tokens forwarded
    out = eng.abort(rid, keep_output=True)
    assert out.prompt_logprobs is None  # incomplete: not returned


@pytest.mark.parametrize("bad", [True, False, -1, 21, 1.0, "1"])
def test_validation(qwen, bad):
    llm = LLM(qwen, max_model_len=64, block_size=8)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=SamplingParams(prompt_logprobs=bad),
                     use_tqdm=False)
    for ok in (None, 0, 20):
        SamplingParams(prompt_logprobs=ok).validate(128)


def test_tensor_parallel_matches_single_rank(qwen, ref, monkeypatch):
    """TP=2 (gloo, vocab-parallel head): every rank computes the same logit pieces (the gather is a collective)."""
    monkeypatch.setattr(model_runner, "PROMPT_LOGITS_ELEMENTS", 3 * 128)  # rank 0 decides; the workers follow
    ps = prompts(3, seed=13, lo=10, hi=30)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    llm = LLM(qwen, max_model_len=256, block_size=8, max_num_seqs=8, num_kv_blocks=64, tensor_parallel_size=2,
              max_num_batched_tokens=16)
    try:
        outs = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    finally:
        llm.close()
    for p, o in zip(ps, outs, strict=True):
        assert_prompt_logprobs(ref, p, o.prompt_logprobs, 2)
