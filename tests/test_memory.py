"""Releasing and resuming the engine's memory (SGLang's /release_memory_occupation and
/resume_memory_occupation) for a trainer colocated on the same GPU: what is freed really holds no
storage, requests are refused meanwhile, and after resume the tokens and routing are those of before."""

import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from routereplay.engine.model_runner import MEMORY_TAGS
from tests.helpers import tiny_checkpoint
from tests.test_engine import prompts

SP = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, return_routed_experts=True)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("memory_ckpts")), "qwen3_moe")


def make(model_dir, **kwargs):
    kwargs = {"max_model_len": 256, "block_size": 8, "num_kv_blocks": 96, "routing_replay": {"enable": True},
              **kwargs}
    return LLM(model_dir, **kwargs)


def run(llm, ps):
    outs = llm.generate(prompt_token_ids=ps, sampling_params=SP, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].routed_experts) for o in outs]


def assert_same(a, b):
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, ra), (_, rb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra, rb)


def caches(runner):
    """Every cache tensor: each layer's K and V, and the routing cache."""
    kv = [t for layer in runner.model.model.layers for t in (layer.self_attn.k_cache, layer.self_attn.v_cache)]
    return kv + ([runner.routing_cache] if runner.routing_cache is not None else [])


def weights(runner):
    return [*runner.model.parameters(), *runner.model.buffers()]


@pytest.mark.parametrize("tags", [["kv_cache"], ["weights"], ["cuda_graph"], ["kv_cache", "weights"], None, []],
                         ids=["kv_cache", "weights", "cuda_graph", "kv_cache+weights", "None", "empty"])
def test_release_frees_and_resume_restores_tokens_and_routing(qwen, tags):
    llm = make(qwen)
    engine, runner = llm.engine, llm.engine.runner
    ps = prompts(5, seed=4)
    ps.append(list(ps[0]))  # a repeat: its prefix is cached, and must be forgotten with the KV cache
    before = run(llm, ps)
    assert engine.scheduler.blocks.cached
    old_caches = caches(runner)
    shapes = [t.shape for t in old_caches]
    params = weights(runner)
    values = [p.detach().clone() for p in params]
    weight_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}.values())

    engine.release_memory(tags)
    want = set(MEMORY_TAGS) if not tags else set(tags)
    assert engine.released == want
    if "kv_cache" in want:
        assert all(t.untyped_storage().nbytes() == 0 for t in old_caches)
        assert all(t.numel() == 0 for t in caches(runner)) and runner.routing_cache is None
        assert not engine.scheduler.blocks.cached  # the prefix cache is forgotten
    else:
        assert all(t.untyped_storage().nbytes() > 0 for t in old_caches if t.numel())
    if "weights" in want:
        assert all(p.untyped_storage().nbytes() == 0 for p in params)
        assert sum(host.numel() for _, host in runner._weight_backup) == weight_bytes
    else:
        assert all(p.untyped_storage().nbytes() > 0 for p in params if p.numel())
    with pytest.raises(ValueError, match=r"memory is released \(.*\): resume_memory first"):
        llm.generate(prompt_token_ids=ps[:1], sampling_params=SP, use_tqdm=False)
    with pytest.raises(ValueError, match="memory is released"):
        engine.add_request(ps[0], SP)
    assert not engine.has_unfinished()

    engine.resume_memory(tags)
    assert engine.released == frozenset()
    assert [t.shape for t in caches(runner)] == shapes
    assert engine.stats()["total_kv_blocks"] == runner.num_blocks == 96
    after_params = weights(runner)
    assert all(a is b for a, b in zip(after_params, params, strict=True))  # the same Parameter objects
    assert all(torch.equal(p, v) for p, v in zip(after_params, values, strict=True))
    assert not runner._weight_backup
    assert_same(run(llm, ps), before)


def test_resume_tag_by_tag_in_a_trainers_order(qwen):
    """slime / verl: release everything, then resume the weights, (the graphs,) and the KV cache last."""
    llm = make(qwen)
    ps = prompts(4, seed=5)
    before = run(llm, ps)
    engine = llm.engine
    engine.release_memory()
    for tag, left in [("weights", {"kv_cache", "cuda_graph"}), ("cuda_graph", {"kv_cache"}), ("kv_cache", set())]:
        engine.resume_memory([tag])
        assert engine.released == left
        if left:
            with pytest.raises(ValueError, match="memory is released"):
                engine.validate(ps[0], SP)
    assert_same(run(llm, ps), before)


def test_release_with_a_request_in_flight_is_refused(qwen):
    llm = make(qwen)
    engine = llm.engine
    ps = prompts(2, seed=6)
    before = run(llm, ps)
    rid = engine.add_request(ps[0], SP)
    engine.step()  # running now, its KV cache in use
    with pytest.raises(ValueError, match="1 requests are in flight: pause and abort them first"):
        engine.release_memory(["kv_cache"])
    with pytest.raises(ValueError, match="1 requests are in flight"):
        engine.release_memory(["weights"])
    assert engine.released == frozenset()
    assert all(t.untyped_storage().nbytes() > 0 for t in caches(engine.runner) if t.numel())
    engine.abort(rid)
    engine.release_memory()  # nothing in flight any more
    engine.resume_memory()
    assert_same(run(llm, ps), before)


def test_release_twice_and_resume_unreleased_are_no_ops(qwen):
    llm = make(qwen)
    engine, runner = llm.engine, llm.engine.runner
    ps = prompts(3, seed=7)
    before = run(llm, ps)
    engine.resume_memory()  # nothing released: nothing to do
    assert engine.released == frozenset()
    engine.release_memory(["weights"])
    backup = runner._weight_backup
    engine.release_memory(["weights"])  # already released: the backup is not taken again (from empty storages)
    assert runner._weight_backup is backup
    engine.release_memory(["weights", "kv_cache"])  # only kv_cache is new
    assert engine.released == {"weights", "kv_cache"}
    engine.resume_memory(["kv_cache"])
    engine.resume_memory(["kv_cache"])  # resumed already
    assert engine.released == {"weights"}
    engine.resume_memory(["weights", "cuda_graph"])  # cuda_graph was never released
    assert engine.released == frozenset()
    assert_same(run(llm, ps), before)


def test_bad_tags_and_tensor_parallel_are_refused(qwen, monkeypatch):
    llm = make(qwen)
    engine = llm.engine
    for call in (engine.release_memory, engine.resume_memory):
        with pytest.raises(ValueError, match=r"unknown tags \['bogus'\]; known: kv_cache, weights, cuda_graph"):
            call(["kv_cache", "bogus"])
        with pytest.raises(ValueError, match="tags must be a list"):
            call("kv_cache")
    assert engine.released == frozenset()
    monkeypatch.setattr(engine.config, "tensor_parallel_size", 2)
    with pytest.raises(NotImplementedError, match=r"release_memory with tensor_parallel_size > 1"):
        engine.release_memory()
    with pytest.raises(NotImplementedError, match=r"resume_memory with tensor_parallel_size > 1"):
        engine.resume_memory()
    assert engine.released == frozenset()


def test_update_weights_after_resume(qwen):
    """Weights released: an update is refused (nothing to write into); resumed (the caches still released,
    as a trainer does it): the update lands, and generation after the KV cache's resume uses it."""
    llm = make(qwen)
    engine = llm.engine
    ps = prompts(4, seed=8)
    old = run(llm, ps)
    g = torch.Generator().manual_seed(0)
    new = {name: p.detach() + 0.05 * torch.randn(p.shape, generator=g).to(p)
           for name, p in engine.runner.model.named_parameters() if not name.endswith("correction_bias")}
    reference = make(qwen)
    reference.update_weights(new)
    expected = run(reference, ps)
    assert [t for t, _ in expected] != [t for t, _ in old]  # the update changes what is generated

    engine.release_memory()
    with pytest.raises(ValueError, match="the weights are released: resume_memory"):
        llm.update_weights(new)
    engine.resume_memory(["weights"])
    assert llm.update_weights(new) == len(new)  # the KV cache still released
    with pytest.raises(ValueError, match=r"memory is released \(kv_cache, cuda_graph\)"):
        run(llm, ps)
    engine.resume_memory(["cuda_graph", "kv_cache"])
    assert_same(run(llm, ps), expected)

    # released again after the update, resumed alone: the backup holds the updated weights
    engine.release_memory(["weights"])
    engine.resume_memory(["weights"])
    assert_same(run(llm, ps), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_release_returns_memory_and_graphs_are_recaptured(qwen):
    """On CUDA with decode graphs: memory_allocated drops by at least the KV cache (then the weights) on
    release; the freed memory is taken by a stand-in trainer, so the resumed tensors land elsewhere and a
    graph still pointing at the old addresses would produce other tokens; after resume the graphs are
    captured again and tokens and routing are those of before."""
    llm = LLM(qwen, dtype="float32", max_model_len=256, block_size=16, max_num_seqs=16, num_kv_blocks=4096,
              routing_replay={"enable": True})
    engine, runner = llm.engine, llm.engine.runner
    assert runner.graphs, "no CUDA graph was captured"
    ps = prompts(12, seed=9)
    before = run(llm, ps)

    kv_bytes = sum(t.untyped_storage().nbytes() for t in caches(runner))
    weight_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                        for p in weights(runner)}.values())
    old_ptrs = [t.data_ptr() for t in caches(runner)]
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    engine.release_memory(["kv_cache"])
    assert not runner.graphs
    dropped_kv = allocated - torch.cuda.memory_allocated()
    assert dropped_kv >= kv_bytes
    engine.release_memory(["weights", "cuda_graph"])
    assert allocated - torch.cuda.memory_allocated() >= kv_bytes + weight_bytes
    assert all(host.is_pinned() for _, host in runner._weight_backup)

    trainer = torch.full(((kv_bytes + weight_bytes) // 4,), float("nan"), device="cuda")  # takes the freed memory
    engine.resume_memory(["weights"])
    assert not runner.graphs  # nothing captured while the KV cache is released
    engine.resume_memory(["cuda_graph"])
    engine.resume_memory(["kv_cache"])
    assert runner.graphs, "the decode graphs were not captured again"
    assert [t.data_ptr() for t in caches(runner)] != old_ptrs
    del trainer
    assert_same(run(llm, ps), before)
    llm.close()
