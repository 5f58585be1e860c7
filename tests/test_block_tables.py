"""The device block tables (one row per running sequence, updated by deltas) against the scheduler's own
block tables, checked after every step by a hook of the test, under preemption, prefix caching and row reuse."""

import torch

from routereplay import LLM, SamplingParams
from tests.helpers import tiny_checkpoint
from tests.test_engine import prompts


def test_device_rows_equal_host_tables_every_step(tmp_path):
    d = tiny_checkpoint(str(tmp_path), "qwen3_moe")
    # 3 rows for 10 requests of 2 samples: rows are recycled; a 14-block pool forces preemptions
    llm = LLM(d, max_model_len=128, block_size=4, max_num_seqs=3, max_num_batched_tokens=24, num_kv_blocks=14,
              routing_replay={"enable": True, "debug": True})
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, n=2)
    ps = prompts(10, seed=11, lo=3, hi=20)
    for p in ps:
        eng.add_request(p, sp)
    outs, steps = [], 0
    while eng.has_unfinished():
        outs += eng.step()
        steps += 1
        running = eng.scheduler.running
        rows = [s.table_row for s in running]
        assert len(set(rows)) == len(rows) and all(0 <= r < 3 for r in rows)
        assert sorted(rows + eng.scheduler.free_rows) == [0, 1, 2]
        for s in running:  # after a step every running sequence's row holds its table (entries past it unread)
            if s.num_table_synced:
                row = eng.runner.block_tables[s.table_row, : s.num_table_synced]
                assert row.tolist() == s.block_table[: s.num_table_synced]
    assert eng.scheduler.num_preemptions > 0
    assert len(outs) == len(ps)
    for o in outs:  # debug rows: the absolute position of each token, whatever rows and slots it went through
        for c in o.outputs:
            n = len(o.prompt_token_ids) + len(c.token_ids) - 1
            assert (c.routed_experts == torch.arange(n)[:, None, None].numpy()).all()
