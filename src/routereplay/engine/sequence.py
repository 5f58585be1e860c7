"""One sample being generated: its tokens, its KV blocks, and how far the model has computed it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from routereplay.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V (and routing rows) are in the cache
    block_table: list[int] = field(default_factory=list)
    table_row: int | None = None  # its row of the model runner's device block tables while running
    num_table_synced: int = 0  # leading block_table entries already written to that row
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full, computed blocks
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # params.top_logprobs > 0
    finish_reason: str | None = None
    stop_reason: str | None = None  # the stop string that ended it
    waits_for: Sequence | None = None  # n > 1: later samples wait until sample 0's prompt is cached
    num_cached_prompt_tokens: int = 0  # prefix-cache hit on admission (stats, tests)
    # params.prompt_logprobs, sample 0 only (shared by the request's samples): entry t for prompt token t, the first
    # None; filled in position order as the prefill forwards positions t - 1 (ModelRunner.run)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether forwards of this sequence must still produce prompt log-probs: then it must not read the
        prefix cache (vLLM V1), so that every prompt position it still lacks is forwarded."""
        return (self.params.prompt_logprobs is not None and self.sample_index == 0
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
