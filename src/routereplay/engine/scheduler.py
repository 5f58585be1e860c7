"""Continuous batching with one token budget per step.

Every step each scheduled sequence contributes the tokens it has not computed yet, capped by the
budget: a decoding sequence contributes 1, a prompt contributes a chunk (chunked prefill), and both
kinds share one batch. Running sequences go first, in arrival order; when KV blocks run out the
newest running sequence is preempted (its blocks freed, recomputed later from its tokens).
"""

from __future__ import annotations

from collections import deque

from routereplay.config import EngineConfig
from routereplay.engine.block_manager import BlockManager
from routereplay.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(config.max_num_seqs - 1, -1, -1))  # block-table rows, lowest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free_rows.append(seq.table_row)
        seq.table_row = None

    def _preempt(self, seq: Sequence) -> None:
        self._stop_running(seq)
        self.blocks.release(seq)
        seq.status, seq.num_computed_tokens = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def preempt_all(self) -> None:
        """Send every running sequence back to the queue, in order; each is recomputed when admitted again."""
        for seq in reversed(self.running):
            self._preempt(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Return [(sequence, number of new tokens to forward)] for the next step."""
        budget = self.max_num_batched_tokens
        block_size = self.blocks.block_size
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            # most steps of a decoding sequence fall inside its last block: nothing to allocate
            while (seq.num_computed_tokens + n > len(seq.block_table) * block_size
                   and not self.blocks.ensure(seq, seq.num_computed_tokens + n)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
                budget -= n
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            parent = seq.waits_for
            if parent is not None and parent.status is not Status.FINISHED and (
                parent.num_computed_tokens < parent.num_prompt_tokens - 1
            ):
                skipped.append(seq)  # admit after sample 0 has cached the shared prompt
                continue
            seq.waits_for = None
            if not seq.block_table:
                cached = self.blocks.match_prefix(seq)
                seq.num_computed_tokens = cached
                if seq.num_generated == 0:
                    seq.num_cached_prompt_tokens = cached
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if not self.blocks.ensure(seq, seq.num_computed_tokens + n):
                if not self.running and not batch:
                    raise RuntimeError(
                        f"KV cache too small: request {seq.request_id} needs "
                        f"{self.blocks.blocks_needed(seq, seq.num_computed_tokens + n)} blocks, "
                        f"{self.blocks.num_free} free"
                    )
                self.blocks.release(seq)
                seq.num_computed_tokens = 0
                self.waiting.appendleft(seq)
                break
            seq.status = Status.RUNNING
            seq.table_row = self.free_rows.pop()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch

    def finish(self, seq: Sequence) -> None:
        """End a running or waiting (aborted) sequence and free its blocks."""
        if seq.status is Status.RUNNING:
            self._stop_running(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.blocks.release(seq)
