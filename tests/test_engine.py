"""The rollout engine on CPU, fp32: exact tokens against transformers and across scheduler paths."""

import math

import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from routereplay.sampling_params import cut_at_stop
from tests.helpers import FAMILIES, assert_logprobs_match_full_forward, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engine_ckpts"))


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 120, (L,), generator=g).tolist() for L in lens]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_equals_transformers_generate(ckpt_root, model_type):
    from transformers import AutoModelForCausalLM

    d = tiny_checkpoint(ckpt_root, model_type)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    llm = LLM(d, max_model_len=256, block_size=8)
    ps = prompts(3, seed=7)
    sp = SamplingParams(temperature=0, max_tokens=12)  # both stop at EOS (kept as the last token)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    for p, o in zip(ps, outs, strict=True):
        with torch.no_grad():
            g = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert o.outputs[0].token_ids == g[0, len(p):].tolist()


@pytest.fixture(scope="module")
def qwen(ckpt_root):
    return tiny_checkpoint(ckpt_root, "qwen3_moe")


@pytest.fixture(scope="module")
def alone(qwen):
    """24 mixed-length requests, each generated alone: the reference for every batching path."""
    llm = LLM(qwen, max_model_len=256, block_size=8, enable_prefix_caching=False)
    ps = prompts(24, seed=3)
    return ps, [tokens(llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False))[0] for p in ps]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # continuous batching, prefix caching on
        dict(enable_prefix_caching=False),
        dict(num_kv_blocks=12),  # tiny pool: forces preemption and recompute
        dict(max_num_batched_tokens=7),  # tiny budget: chunked prefill mixed with decode
        dict(max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=16),
    ],
    ids=["batched", "no-prefix-cache", "preemption", "chunked-prefill", "all-constraints"],
)
def test_batch_paths_match_requests_alone(qwen, alone, kwargs):
    ps, expected = alone
    llm = LLM(qwen, max_model_len=256, block_size=8, **kwargs)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False)
    assert tokens(outs) == expected
    if "num_kv_blocks" in kwargs and kwargs["num_kv_blocks"] == 12:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_and_same_tokens(qwen):
    llm = LLM(qwen, max_model_len=256, block_size=4)
    shared = prompts(1, seed=11, lo=30, hi=31)[0]
    first = llm.generate(prompt_token_ids=[shared + [5, 6]], sampling_params=GREEDY, use_tqdm=False)[0]
    second = llm.generate(prompt_token_ids=[shared + [5, 6]], sampling_params=GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 28 and first.num_cached_tokens == 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_seeded_sampling_is_batch_independent(qwen):
    llm = LLM(qwen, max_model_len=256, block_size=8)
    ps = prompts(6, seed=5)
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=10, seed=1234, ignore_eos=True)
    together = tokens(llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False))
    alone_ = [tokens(llm.generate(prompt_token_ids=[p], sampling_params=sp, use_tqdm=False))[0] for p in ps]
    assert together == alone_
    other = tokens(llm.generate(prompt_token_ids=ps[:1], sampling_params=SamplingParams(
        temperature=0.9, max_tokens=10, seed=99, ignore_eos=True), use_tqdm=False))
    assert other[0] != together[0]


def test_n_samples_share_prompt_and_differ(qwen):
    llm = LLM(qwen, max_model_len=256, block_size=4)
    p = prompts(1, seed=9, lo=20, hi=21)[0]
    out = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        n=4, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 4 and len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_logprobs_equal_full_forward_log_softmax(qwen):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32).eval()
    llm = LLM(qwen, max_model_len=256, block_size=8)
    ps = prompts(4, seed=21)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SamplingParams(
        temperature=1.0, max_tokens=10, seed=0, ignore_eos=True), use_tqdm=False)
    assert_logprobs_match_full_forward(ref, ps, outs)


def test_top_logprobs_vllm_style_and_truncated(qwen):
    llm = LLM(qwen, max_model_len=256, block_size=8)
    ps = prompts(3, seed=4)
    greedy, top2, none = llm.generate(prompt_token_ids=ps, sampling_params=[
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),  # vLLM: logprobs=N
        SamplingParams(temperature=1.0, top_k=2, max_tokens=6, seed=1, ignore_eos=True, top_logprobs=5),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=None),
    ], use_tqdm=False)
    c = greedy.outputs[0]
    assert len(c.top_logprobs) == len(c.token_ids) == 6
    for token, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True):
        values = list(top.values())
        assert len(top) == 3 and values == sorted(values, reverse=True)
        assert next(iter(top)) == token and top[token] == pytest.approx(lp, abs=1e-5)
    c = top2.outputs[0]
    for token, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True):
        assert len(top) == 2 and token in top and top[token] == pytest.approx(lp, abs=1e-5)  # top-k 2: two tokens
        assert sum(math.exp(x) for x in top.values()) == pytest.approx(1.0, abs=1e-5)
    assert none.outputs[0].logprobs is None and none.outputs[0].top_logprobs is None
    with pytest.raises(ValueError, match="top_logprobs must be an integer in"):
        llm.generate(prompt_token_ids=ps[:1], sampling_params=SamplingParams(logprobs=21), use_tqdm=False)


def test_update_weights_equals_loading_from_disk(qwen, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "modified")
    from routereplay.tiny import make_tokenizer

    make_tokenizer(str(tmp_path / "modified"))
    ps = prompts(4, seed=2)
    synced = LLM(qwen, max_model_len=256, block_size=8)
    before = tokens(synced.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False))
    assert synced.update_weights(hf.named_parameters()) > 0
    after = tokens(synced.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False))
    loaded = LLM(str(tmp_path / "modified"), max_model_len=256, block_size=8)
    assert after == tokens(loaded.generate(prompt_token_ids=ps, sampling_params=GREEDY, use_tqdm=False))
    assert after != before


def test_update_weights_rejects_bad_names_without_writing(qwen):
    llm = LLM(qwen, max_model_len=256)
    w = llm.engine.runner.model.model.norm.weight.clone()
    with pytest.raises(ValueError, match="unexpected tensor 'nope'"):
        llm.update_weights({"model.norm.weight": torch.zeros_like(w), "nope": torch.zeros(1)})
    assert torch.equal(llm.engine.runner.model.model.norm.weight, w)


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=[5] * 300), "max_model_len"),
        (dict(prompt=[5, 100000]), r"prompt_token_ids\[1\]"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(stop=["ok", ""]), "stop must be a list of non-empty strings"),
        (dict(stop=[b"ok"]), "stop must be a list of non-empty strings"),
    ],
)
def test_bad_input_names_request_and_field(qwen, bad, field):
    llm = LLM(qwen, max_model_len=256)
    good = [5, 6, 7]
    prompt = bad.pop("prompt", good)
    sp = [GREEDY, SamplingParams(**{"temperature": 0, "max_tokens": 4, **bad})]
    with pytest.raises(ValueError, match=rf"request 1: .*{field}"):
        llm.generate(prompt_token_ids=[good, prompt], sampling_params=sp, use_tqdm=False)
    assert not llm.engine.has_unfinished()
    out = llm.generate(prompt_token_ids=[good], sampling_params=GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12


def test_string_prompts_use_the_checkpoint_tokenizer(qwen):
    llm = LLM(qwen, max_model_len=256)
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer("hello")["input_ids"]
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_min_tokens_masks_what_would_stop_the_completion(qwen):
    llm = LLM(qwen, max_model_len=256)
    prompt = [5, 6, 7, 8]

    def run(**kw):
        return llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            temperature=0, max_tokens=12, **kw), use_tqdm=False)[0].outputs[0]

    free = run(ignore_eos=True, top_logprobs=5)
    stop_id = free.token_ids[0]  # greedy's first token, made a stop token
    assert run(stop_token_ids=[stop_id]).token_ids == [stop_id]
    held = run(stop_token_ids=[stop_id], min_tokens=5)
    assert len(held.token_ids) >= 5 and stop_id not in held.token_ids[:5]
    assert held.finish_reason == ("stop" if held.token_ids[-1] == stop_id else "length")
    # the first token comes from the distribution without stop_id (and EOS): renormalised, more likely
    unmasked = free.top_logprobs[0]
    assert held.token_ids[0] in unmasked and held.logprobs[0] > unmasked[held.token_ids[0]]
    with pytest.raises(ValueError, match=r"min_tokens must be an integer in \[0, max_tokens=12\]"):
        run(min_tokens=13)


def test_penalties_shape_the_distribution_sampled_from(qwen):
    """Greedy tokens and log-probs with penalties equal transformers' logits penalised by hand: repetition
    over prompt + output (first token), presence + frequency over the output (second token)."""
    from tests.helpers import reference_forward

    llm = LLM(qwen, max_model_len=256)
    prompt = [5, 6, 7, 8, 5]
    pen = dict(repetition_penalty=1.7, presence_penalty=0.6, frequency_penalty=0.9)
    c = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=2, ignore_eos=True, **pen), use_tqdm=False)[0].outputs[0]

    def penalised(ids: list[int], output: list[int]) -> torch.Tensor:
        row = reference_forward(qwen, ids)[0][-1].clone()
        seen = torch.tensor(sorted(set(ids)))
        row[seen] = torch.where(row[seen] > 0, row[seen] / 1.7, row[seen] * 1.7)
        for t in set(output):
            row[t] -= 0.9 * output.count(t) + 0.6
        return torch.log_softmax(row, -1)

    for k in range(2):
        expect = penalised(prompt + c.token_ids[:k], c.token_ids[:k])
        assert c.token_ids[k] == int(expect.argmax())
        assert c.logprobs[k] == pytest.approx(float(expect[c.token_ids[k]]), abs=1e-4)
    plain = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs[0] != pytest.approx(c.logprobs[0], abs=1e-3)  # the penalty changed something
    with pytest.raises(ValueError, match=r"presence_penalty must be in \[-2, 2\]"):
        llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(presence_penalty=3), use_tqdm=False)


def test_skip_special_tokens_false_keeps_them_in_text(qwen):
    llm = LLM(qwen, max_model_len=256)
    specials = set(llm.tokenizer.all_special_ids)
    sp = dict(temperature=1.0, max_tokens=40, ignore_eos=True, seed=3, n=6)
    def run(**extra):
        return llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(**sp, **extra),
                            use_tqdm=False)[0].outputs

    kept, skipped = run(skip_special_tokens=False), run()
    assert any(specials & set(c.token_ids) for c in kept), "no special token sampled: pick another seed"
    for k, s in zip(kept, skipped, strict=True):
        assert k.token_ids == s.token_ids
        assert k.text == llm.tokenizer.decode(k.token_ids, skip_special_tokens=False)
        assert s.text == llm.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        assert (k.text != s.text) == bool(specials & set(k.token_ids))


def test_batched_tail_decode_equals_tokenizer_decode(qwen):
    """Stop strings are matched against one batched decode per step: it must give tokenizer.decode's text,
    through the Rust backend and through transformers (when spaces are cleaned up)."""
    llm = LLM(qwen, max_model_len=256)
    tok = llm.engine.tokenizer
    tails = [[5, 6, 2, 7], [9, 1, 0], [40, 41, 12, 13]]
    for clean_up in (False, True):
        tok.clean_up_tokenization_spaces = clean_up
        for skip in (True, False):
            assert llm.engine._decode_batch(tails, skip) == [tok.decode(t, skip_special_tokens=skip) for t in tails]


def test_cut_at_stop_earliest_string_and_held_back_prefixes():
    assert cut_at_stop("ab</a>cd", ["cd", "</a>"]) == "ab"  # the earliest occurrence wins
    assert cut_at_stop("xx cd </a>", ["</a>", "cd"], include=True) == "xx cd"
    assert cut_at_stop("abc</", ["</a>"], final=False) == "abc"  # "</" may still become "</a>"
    assert cut_at_stop("abc</", ["</a>"]) == "abc</"  # finished for another reason: nothing held back
    assert cut_at_stop("abc<<", ["<<x", "<x"], final=False) == "abc"  # the longest possible prefix is held


def test_stop_strings_end_the_completion_and_keep_routing_exact(qwen, tmp_path):
    llm = LLM(qwen, max_model_len=256, routing_replay={"enable": True, "debug": True})
    sp = dict(temperature=0, max_tokens=24, ignore_eos=True)
    free = llm.generate(["Hi"], SamplingParams(**sp), use_tqdm=False)[0].outputs[0]
    stop = free.text[6:9]
    start = free.text.find(stop)
    dec = llm.tokenizer.decode
    ends = next(k for k in range(1, 25) if stop in dec(free.token_ids[:k], skip_special_tokens=True))
    out = llm.generate(["Hi"], SamplingParams(**sp, stop=["never-seen", stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", stop, free.text[:start])
    assert c.token_ids == free.token_ids[:ends]  # up to the token completing the stop string
    kept = llm.generate(["Hi"], SamplingParams(**sp, stop=stop, include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == free.text[: start + len(stop)] and kept[0].outputs[0].token_ids == c.token_ids
    rows = len(out.prompt_token_ids) + len(c.token_ids) - 1
    np.testing.assert_array_equal(c.routed_experts[:, 0, 0], np.arange(rows))  # debug rows: one per position
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(qwen, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        LLM(str(bare), max_model_len=64).generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(
            stop=["x"]), use_tqdm=False)
