"""Rollout routing capture: exact bookkeeping (debug mode) and exact expert sets (fp32)."""

import numpy as np
import pytest

from routereplay import LLM, SamplingParams
from tests.helpers import FAMILIES, reference_forward, tiny_checkpoint
from tests.test_engine import prompts


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("capture_ckpts"))


DEBUG = {"enable": True, "debug": True}


def assert_positions(out, start=0):
    """Debug mode: row t holds absolute position start + t in every layer and slot."""
    for c in out.outputs:
        n = len(out.prompt_token_ids) + len(c.token_ids)
        r = c.routed_experts
        assert r.shape[0] == n - 1 - start, (r.shape, n, start)
        expected = np.arange(start, n - 1)[:, None, None]
        bad = np.argwhere(r != expected)
        assert bad.size == 0, f"request {out.request_id} sample {c.index}: first wrong (row, layer, k) {bad[0]}"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(enable_prefix_caching=False),
        dict(num_kv_blocks=22),  # preemption + recompute
        dict(max_num_batched_tokens=9),  # chunked prefill
        dict(max_num_seqs=4, max_num_batched_tokens=13, num_kv_blocks=20),
    ],
    ids=["batched", "no-prefix-cache", "preemption", "chunked", "all-constraints"],
)
def test_debug_rows_are_positions_under_every_scheduler_path(ckpt_root, kwargs):
    d = tiny_checkpoint(ckpt_root, "qwen3_moe")
    llm = LLM(d, max_model_len=256, block_size=4, routing_replay=DEBUG, **kwargs)
    ps = prompts(32, seed=4, lo=2, hi=45)
    shared = ps[0][:2] * 10  # a common 20-token prefix for the prefix cache
    ps = [shared + p if i % 3 == 0 else p for i, p in enumerate(ps)]
    sps = [SamplingParams(temperature=1.0, max_tokens=3 + i % 9, seed=i, n=1 + (i % 5 == 0), ignore_eos=True)
           for i in range(len(ps))]
    first = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)  # prefix-cache hits
    for o in first + outs:
        assert_positions(o)
    if kwargs.get("num_kv_blocks") == 22:
        assert llm.engine.scheduler.num_preemptions > 0
    if not kwargs:
        assert any(o.num_cached_tokens > 0 for o in outs)


def test_debug_multi_turn_reuses_first_turn(ckpt_root):
    d = tiny_checkpoint(ckpt_root, "glm4_moe")
    llm = LLM(d, max_model_len=256, block_size=4, routing_replay=DEBUG)
    sp = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    turn1 = llm.generate(prompt_token_ids=[prompts(1, seed=1, lo=17, hi=18)[0]], sampling_params=sp,
                         use_tqdm=False)[0]
    history = turn1.prompt_token_ids + turn1.outputs[0].token_ids + [7, 8, 9]
    held = len(turn1.prompt_token_ids) + len(turn1.outputs[0].token_ids) - 1
    sp2 = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, routed_experts_start=held)
    turn2 = llm.generate(prompt_token_ids=[history], sampling_params=sp2, use_tqdm=False)[0]
    assert turn2.num_cached_tokens >= 20
    assert_positions(turn1)
    assert_positions(turn2, start=held)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routed_experts_equal_full_forward_selection(ckpt_root, model_type):
    d = tiny_checkpoint(ckpt_root, model_type)
    ps = prompts(5, seed=8)
    sp = SamplingParams(temperature=1.0, max_tokens=7, seed=5, ignore_eos=True)
    runs = {}
    for caching in (True, False):
        llm = LLM(d, max_model_len=256, block_size=4, enable_prefix_caching=caching,
                  routing_replay={"enable": True})
        # run twice with caching so the second pass is served from the prefix cache
        llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
        runs[caching] = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        np.testing.assert_array_equal(a.outputs[0].routed_experts, b.outputs[0].routed_experts)
    assert any(o.num_cached_tokens > 0 for o in runs[True])
    for p, o in zip(ps, runs[True], strict=True):
        c = o.outputs[0]
        r = c.routed_experts
        assert r.dtype == np.uint8 and r.shape[1:] == (len(o.moe_layer_ids), 2)
        _, ref_ids = reference_forward(d, p + c.token_ids[:-1])
        np.testing.assert_array_equal(np.sort(r, -1), np.sort(ref_ids.numpy(), -1).astype(np.uint8))
        assert (r < 8).all()
        assert (np.sort(r, -1)[..., 1:] != np.sort(r, -1)[..., :-1]).all(), "duplicate ids in a row"


def test_asking_for_routing_without_capture_is_an_error(ckpt_root):
    llm = LLM(tiny_checkpoint(ckpt_root, "qwen3_moe"), max_model_len=256)
    with pytest.raises(ValueError, match="request 0: .*routing capture is disabled"):
        llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(return_routed_experts=True),
                     use_tqdm=False)
    out = llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)
    assert out[0].outputs[0].routed_experts is None


def test_routed_experts_start_beyond_prompt_is_rejected(ckpt_root):
    llm = LLM(tiny_checkpoint(ckpt_root, "qwen3_moe"), max_model_len=256, routing_replay={"enable": True})
    with pytest.raises(ValueError, match="routed_experts_start"):
        llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(routed_experts_start=3),
                     use_tqdm=False)


def test_routing_goes_to_the_local_store(ckpt_root, tmp_path):
    from routereplay.store import open as open_store

    rr = {"enable": True, "store": "local", "local_store_dir": str(tmp_path / "routing")}
    llm = LLM(tiny_checkpoint(ckpt_root, "qwen3_moe"), max_model_len=256, routing_replay=rr)
    sps = [SamplingParams(max_tokens=4, rollout_id="r1"), SamplingParams(max_tokens=4, n=2, rollout_id="r2"),
           SamplingParams(max_tokens=4, rollout_id="eval", store_routing=False, return_routed_experts=True,
                          ignore_eos=True)]
    outs = llm.generate(prompt_token_ids=[[4, 5, 6], [7, 8], [9, 10]], sampling_params=sps, use_tqdm=False)
    llm.close()
    store = open_store(str(tmp_path / "routing"))
    assert store.keys() == ["r1", "r2/0", "r2/1"]  # not "eval"
    eval_out = outs.pop().outputs[0]
    assert eval_out.routing_key is None and eval_out.routed_experts.shape[0] == 2 + 4 - 1
    for o in outs:
        for c in o.outputs:
            assert c.routing_error is None
            np.testing.assert_array_equal(store.get(c.routing_key), c.routed_experts)




def test_abort_keeps_what_was_generated_with_exact_routing(ckpt_root, tmp_path):
    """SGLang-style abort: decoding samples end with their tokens and exact routing (stored too); samples in
    prefill or still queued end without routing; blocks are freed and the engine goes on."""
    from routereplay.store import open as open_store

    rr = {**DEBUG, "store": "local", "local_store_dir": str(tmp_path / "routing")}
    llm = LLM(tiny_checkpoint(ckpt_root, "qwen3_moe"), max_model_len=256, block_size=4,
              max_num_batched_tokens=16, routing_replay=rr)
    engine = llm.engine
    sp = dict(temperature=1.0, max_tokens=60, ignore_eos=True, seed=7)
    dec = engine.add_request(list(range(5, 15)), SamplingParams(**sp, n=2, rollout_id="dec"))
    engine.step(), engine.step()  # both samples decode from here on
    pre = engine.add_request(list(range(3, 60)), SamplingParams(**sp, rollout_id="pre"))  # 57 tokens, 14 a step
    engine.step(), engine.step()
    queued = engine.add_request([5, 6, 7], SamplingParams(**sp, rollout_id="queued"))
    assert engine.abort("no-such-request", keep_output=True) is None

    out = engine.abort(dec, keep_output=True)
    assert [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert all(len(c.token_ids) >= 1 and c.routing_error is None for c in out.outputs)
    assert_positions(out)  # rows 0 .. n-2, each its own position
    for rid in (pre, queued):
        c = engine.abort(rid, keep_output=True).outputs[0]
        assert c.finish_reason == "abort" and c.token_ids == [] and c.routed_experts is None
        assert "routing rows computed" in c.routing_error
    assert not engine.has_unfinished()
    assert engine.scheduler.blocks.num_free == llm.engine.runner.num_blocks
    full = llm.generate(prompt_token_ids=[list(range(5, 15))], sampling_params=SamplingParams(**sp, n=2),
                        use_tqdm=False)[0]
    for c, whole in zip(out.outputs, full.outputs, strict=True):  # seeded: the same tokens, cut short
        assert whole.token_ids[: len(c.token_ids)] == c.token_ids
    llm.close()
    store = open_store(str(tmp_path / "routing"))
    keys = set(store.keys())
    assert {"dec/0", "dec/1"} <= keys and not {"pre", "queued"} & keys
    for c in out.outputs:
        np.testing.assert_array_equal(store.get(c.routing_key), c.routed_experts)


def test_unstorable_rollout_id_is_rejected_up_front(ckpt_root, tmp_path):
    rr = {"enable": True, "store": "local", "local_store_dir": str(tmp_path / "routing")}
    llm = LLM(tiny_checkpoint(ckpt_root, "qwen3_moe"), max_model_len=256, routing_replay=rr)
    for bad in ("a\x00b", "\ud800", ""):
        with pytest.raises(ValueError, match="request 0: rollout_id"):
            llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(rollout_id=bad), use_tqdm=False)
    out = llm.generate(prompt_token_ids=[[4, 5]], sampling_params=SamplingParams(max_tokens=2, rollout_id="../x"),
                       use_tqdm=False)
    assert out[0].outputs[0].routing_error is None
    llm.close()
