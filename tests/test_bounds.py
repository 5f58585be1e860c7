"""Request bounds (issue 15): bad values are a ValueError naming the field before anything is queued, and a
broken distribution fails only its own request. CPU, fp32, a tiny model."""

import logging
import math

import pytest

from routereplay import LLM, SamplingParams
from routereplay.config import EngineConfig
from routereplay.sampling_params import MAX_N
from routereplay.store.local import LocalStore
from tests.helpers import tiny_checkpoint

MAX_MODEL_LEN = 64
GOOD = [5, 6, 8]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("bounds_ckpts")), "qwen3_moe")


@pytest.fixture(scope="module")
def llm(qwen):
    return LLM(qwen, max_model_len=MAX_MODEL_LEN, block_size=8, max_num_seqs=16)


def generate(llm, prompts, params):
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


VOCAB = 128  # tiny.COMMON
BAD = [
    (dict(top_k=2**63), "top_k"),
    (dict(top_k=VOCAB + 1), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(seed=2**63), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=True), "seed"),
    (dict(n=True), "n"),
    (dict(n=10**6), "n"),
    (dict(n=MAX_N + 1), "n"),
    (dict(n=17), "n"),  # > max_num_seqs
    (dict(max_tokens="5"), "max_tokens"),
    (dict(max_tokens=2**63), "max_tokens"),
    (dict(max_tokens=MAX_MODEL_LEN - len(GOOD) + 1), "max_tokens"),  # beyond the context
    (dict(min_tokens=True), "min_tokens"),
    (dict(min_tokens=1, stop_token_ids=list(range(VOCAB))), "min_tokens"),
    (dict(min_tokens=1, stop_token_ids=[t for t in range(VOCAB) if t != 2]), "min_tokens"),  # + EOS (2)
    (dict(top_logprobs=True), "top_logprobs"),
    (dict(routed_experts_start=True), "routed_experts_start"),
    (dict(routed_experts_start=2**63), "routed_experts_start"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=1e39), "temperature"),  # finite in float64, inf in float32
    (dict(temperature=10**400), "temperature"),  # an int beyond float64
    (dict(temperature=True), "temperature"),
    (dict(top_p=1e-300), "top_p"),  # 0 in float32
    (dict(top_p=math.nan), "top_p"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(repetition_penalty=1e39), "repetition_penalty"),
    (dict(repetition_penalty=1e-40), "repetition_penalty"),
    (dict(presence_penalty=math.inf), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(include_stop_str_in_output=0), "include_stop_str_in_output"),
    (dict(skip_special_tokens=None), "skip_special_tokens"),
    (dict(store_routing="yes"), "store_routing"),
    (dict(return_routed_experts=1), "return_routed_experts"),
]


@pytest.mark.parametrize("bad, field", BAD, ids=[f"{f}={next(iter(b.values()))!r}"[:40] for b, f in BAD])
def test_bad_value_names_the_field_and_queues_nothing(llm, bad, field):
    sp = SamplingParams(**{"temperature": 0, "max_tokens": 4, **bad})
    with pytest.raises(ValueError, match=rf"^request 1: {field}\b") as e:
        generate(llm, [GOOD, GOOD], [GREEDY, sp])
    from routereplay.server.protocol import engine_param  # here: the GPU machine has no fastapi

    assert engine_param(str(e.value).removeprefix("request 1: "), "prompt") == field  # the server's 400 field
    assert not llm.engine.requests and not llm.engine.scheduler.waiting and not llm.engine.scheduler.running
    assert len(generate(llm, [GOOD], GREEDY)[0].outputs[0].token_ids) == 8


def test_max_tokens_beyond_the_context_is_rejected_not_clamped(llm):
    sp = SamplingParams(max_tokens=MAX_MODEL_LEN)
    with pytest.raises(ValueError) as e:
        llm.engine.validate(GOOD, sp)
    assert str(e.value) == (f"max_tokens: this model's maximum context length is {MAX_MODEL_LEN} tokens; "
                            f"the prompt has {len(GOOD)} tokens and max_tokens is {MAX_MODEL_LEN}")
    # exactly the context is fine, and runs to the end
    c = generate(llm, [GOOD], SamplingParams(temperature=0, max_tokens=MAX_MODEL_LEN - len(GOOD),
                                             ignore_eos=True))[0].outputs[0]
    assert len(c.token_ids) == MAX_MODEL_LEN - len(GOOD) and c.finish_reason == "length"


def test_bounds_that_stay_valid(llm):
    """The edges of each bound are accepted: top_k 0 / -1 / vocab size are off, n = MAX_N fits the params, and
    min_tokens with every token but EOS masked is fine under ignore_eos (EOS is then the only token left)."""
    SamplingParams(n=MAX_N, top_k=VOCAB, seed=2**63 - 1, temperature=3e38).validate(VOCAB)
    sampled = SamplingParams(temperature=1.0, max_tokens=6, seed=3, ignore_eos=True)
    ref = generate(llm, [GOOD], sampled)[0].outputs[0]
    for top_k in (0, VOCAB):
        c = generate(llm, [GOOD], SamplingParams(temperature=1.0, max_tokens=6, seed=3, ignore_eos=True,
                                                 top_k=top_k))[0].outputs[0]
        assert c.token_ids == ref.token_ids and c.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    only_eos = SamplingParams(temperature=0, max_tokens=2, min_tokens=2, ignore_eos=True,
                              stop_token_ids=[t for t in range(VOCAB) if t != 2])
    c = generate(llm, [GOOD], only_eos)[0].outputs[0]
    assert c.token_ids == [2, 2] and c.logprobs == [0.0, 0.0]


@pytest.mark.parametrize("temperature", [1e-45, 1e-6])
def test_temperature_below_eps_is_greedy(llm, temperature):
    """A float32 denormal temperature would divide logits to inf (NaN distribution, token 0 every step)."""
    prompts = [GOOD, [10, 11, 12, 13]]
    greedy = generate(llm, prompts, GREEDY)
    tiny = generate(llm, prompts, SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True, seed=1,
                                                 top_logprobs=2))
    for g, t in zip(greedy, tiny, strict=True):
        assert t.error is None and t.outputs[0].token_ids == g.outputs[0].token_ids
        assert t.outputs[0].logprobs == pytest.approx(g.outputs[0].logprobs, abs=1e-5)  # plain log-softmax
        assert all(math.isfinite(lp) for lp in t.outputs[0].logprobs)


def test_max_model_len_above_the_model_warns_and_clamps(qwen, caplog):
    with caplog.at_level(logging.WARNING, logger="routereplay.config"):
        cfg = EngineConfig(model=qwen, max_model_len=4096)
    assert cfg.max_model_len == 1024
    assert "max_model_len 4096 is above the model's max_position_embeddings 1024" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="routereplay.config"):
        assert EngineConfig(model=qwen, max_model_len=1024).max_model_len == 1024
    assert not caplog.records


def test_a_broken_distribution_fails_only_its_own_request(qwen, tmp_path, caplog):
    """Real numerics, no mock: one embedding row made NaN. A prompt holding that token fails at its first
    sample (prefill), one whose output reaches it fails the step after sampling it (decode); both end with
    finish_reason "error", the message, what they generated before and no routing stored. A request in the
    same batch that never touches the token generates what it generates with the healthy weights."""
    llm = LLM(qwen, max_model_len=MAX_MODEL_LEN, block_size=8,
              routing_replay={"enable": True, "store": "local", "local_store_dir": str(tmp_path)})
    reaches, healthy = [10, 11, 12, 13], [20, 30, 40]
    before = generate(llm, [reaches, healthy], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                              store_routing=False))
    bad = before[0].outputs[0].token_ids[2]  # the third token `reaches` generates
    assert bad not in reaches + before[0].outputs[0].token_ids[:2]
    assert bad not in healthy + before[1].outputs[0].token_ids  # `healthy` never forwards it (greedy, no EOS)
    holds = [5, bad, 9]
    w = llm.engine.runner.model.model.embed_tokens.weight.detach().clone()
    w[bad] = float("nan")
    assert llm.update_weights({"model.embed_tokens.weight": w}) == 1

    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, rollout_id=r, top_logprobs=2)
              for r in ("holds", "reaches", "healthy")]
    with caplog.at_level(logging.ERROR, logger="routereplay.engine"):
        outs = generate(llm, [holds, reaches, healthy], params)
    first, second, third = outs
    msg = "sample 0: the model produced a non-finite distribution at position {} (NaN logits)"
    assert first.error == msg.format(len(holds))
    assert second.error == msg.format(len(reaches) + 3)
    for out, kept in ((first, []), (second, before[0].outputs[0].token_ids[:3])):
        c = out.outputs[0]
        assert c.finish_reason == "error" and c.token_ids == kept and len(c.logprobs) == len(kept)
        assert all(math.isfinite(lp) for lp in c.logprobs) and len(c.top_logprobs) == len(kept)
        assert c.routing_key is None and c.routed_experts is None and c.store_future is None
        assert out.error in caplog.text
    c = third.outputs[0]
    assert third.error is None and c.finish_reason == "length"
    assert c.token_ids == before[1].outputs[0].token_ids
    assert c.logprobs == pytest.approx(before[1].outputs[0].logprobs, abs=1e-5)
    assert c.routing_key == "healthy" and c.routed_experts is not None
    assert LocalStore(str(tmp_path)).keys() == ["healthy"]
    # nothing left behind, and the engine goes on (the same prompt fails again, alone)
    eng = llm.engine
    assert not eng.requests and not eng.scheduler.running and not eng.scheduler.waiting
    assert eng.scheduler.blocks.num_free == eng.runner.num_blocks
    again = generate(llm, [holds], SamplingParams(temperature=0.8, seed=0, max_tokens=4, store_routing=False))[0]
    assert again.error == msg.format(len(holds)) and again.outputs[0].finish_reason == "error"
    llm.close()


def test_every_unfinished_sample_of_a_failed_request_ends(llm):
    """n > 1: when one sample's distribution breaks, every unfinished sample of its request ends with "error" in
    that step, with what it had generated; a sample that had stopped keeps its output and reason."""
    prompt = [10, 11, 12, 13]
    sp = dict(n=4, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    ref = [c.token_ids for c in generate(llm, [prompt], SamplingParams(**sp))[0].outputs]
    bad, stop = ref[0][3], ref[1][0]  # sample 0 forwards `bad` after 4 tokens; sample 1 stops at its first
    assert all(bad not in r for r in (prompt, ref[0][:3], *ref[1:])) and all(stop not in r[:4] for r in ref[::2])
    healthy = llm.engine.runner.model.model.embed_tokens.weight.detach().clone()
    w = healthy.clone()
    w[bad] = float("nan")
    llm.update_weights({"model.embed_tokens.weight": w})
    try:
        out = generate(llm, [prompt], SamplingParams(**sp, stop_token_ids=[stop]))[0]
    finally:
        llm.update_weights({"model.embed_tokens.weight": healthy})
    assert out.error == ("sample 0: the model produced a non-finite distribution at position "
                         f"{len(prompt) + 4} (NaN logits)")
    c = out.outputs
    assert (c[0].finish_reason, c[0].token_ids) == ("error", ref[0][:4])
    assert (c[1].finish_reason, c[1].token_ids) == ("stop", [stop])
    for i in (2, 3):  # they run a step behind sample 0 or with it (they wait for its prompt to be cached)
        assert c[i].finish_reason == "error" and 3 <= len(c[i].token_ids) <= 4
        assert c[i].token_ids == ref[i][: len(c[i].token_ids)]
    assert generate(llm, [prompt], SamplingParams(**sp))[0].outputs[0].token_ids == ref[0]
