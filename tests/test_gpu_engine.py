"""The engine on CUDA in bf16 with CUDA graphs (skipped without a GPU)."""

import numpy as np
import pytest
import torch

from routereplay import LLM, SamplingParams
from routereplay.tiny import TINY_CONFIGS
from tests.helpers import tiny_checkpoint
from tests.test_engine import prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("gpu_ckpts")), "qwen3_moe")


def test_graphs_match_eager_and_debug_rows_are_positions(qwen):
    ps = prompts(40, seed=1, lo=2, hi=60)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    graphs = LLM(qwen, dtype="float32", max_model_len=256, block_size=16, max_num_seqs=64, num_kv_blocks=512,
                 routing_replay={"enable": True, "debug": True})
    assert graphs.engine.runner.graphs, "no CUDA graph was captured"
    eager = LLM(qwen, dtype="float32", max_model_len=256, block_size=16, enforce_eager=True, num_kv_blocks=512,
                routing_replay={"enable": True, "debug": True})
    a = graphs.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    b = eager.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    for o in a:
        r = o.outputs[0].routed_experts
        n = len(o.prompt_token_ids) + len(o.outputs[0].token_ids)
        np.testing.assert_array_equal(r, np.broadcast_to(np.arange(n - 1)[:, None, None], r.shape))


def test_routing_from_the_copier_thread_is_exact_and_not_pinned(qwen):
    """Samples finish at different steps, under preemption and table-row reuse: each finish burst's rows are
    gathered from the device block tables and copied by the copier thread while later steps run. Debug rows
    must be the positions, and the arrays plain pageable memory (no pinned buffer kept alive by users)."""
    llm = LLM(qwen, dtype="float32", max_model_len=256, block_size=16, max_num_seqs=8, num_kv_blocks=24,
              routing_replay={"enable": True, "debug": True})
    ps = prompts(24, seed=3, lo=2, hi=60)
    sps = [SamplingParams(temperature=0, max_tokens=1 + 3 * i, ignore_eos=True, n=1 + i % 3) for i in range(24)]
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sps, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0, "the test must preempt"
    for o, sp in zip(outs, sps, strict=True):
        assert len(o.outputs) == sp.n
        for c in o.outputs:
            r = c.routed_experts
            assert len(c.token_ids) == sp.max_tokens
            n = len(o.prompt_token_ids) + len(c.token_ids)
            np.testing.assert_array_equal(r, np.broadcast_to(np.arange(n - 1)[:, None, None], r.shape))
            assert not torch.from_numpy(r).is_pinned()


def test_bf16_routing_rows_are_distinct_ids_under_graphs(qwen):
    llm = LLM(qwen, dtype="bfloat16", max_model_len=256, routing_replay={"enable": True}, num_kv_blocks=64)
    outs = llm.generate(prompt_token_ids=prompts(16, seed=2), sampling_params=SamplingParams(
        temperature=1.0, max_tokens=20, seed=0, ignore_eos=True, n=2), use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            r = np.sort(c.routed_experts, -1)
            assert r.shape[0] == len(o.prompt_token_ids) + len(c.token_ids) - 1
            assert (r < 8).all() and (r[..., 1:] != r[..., :-1]).all()


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_family_on_cuda_matches_cpu(tmp_path_factory, model_type):
    """Each family's layers build and run on the GPU (buffers included) with the CPU's tokens and routing."""
    d = tiny_checkpoint(str(tmp_path_factory.mktemp("families")), model_type)
    ps = prompts(6, seed=3)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = []
    for device in ("cpu", "cuda"):
        llm = LLM(d, dtype="float32", device=device, max_model_len=256, block_size=8, max_num_seqs=8,
                  num_kv_blocks=256, routing_replay={"enable": True})
        runs.append(llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False))
        llm.close()
    for cpu, cuda in zip(*runs, strict=True):
        assert cpu.outputs[0].token_ids == cuda.outputs[0].token_ids
        np.testing.assert_array_equal(np.sort(cpu.outputs[0].routed_experts, -1),
                                      np.sort(cuda.outputs[0].routed_experts, -1))
