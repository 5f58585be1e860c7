"""What `generate` returns (vLLM-compatible names plus the routing record)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    text: str | None = None
    stop_reason: str | None = None  # the stop string that ended the completion (`text` ends before it,
    # or with it when include_stop_str_in_output)
    # per generated token, the params.top_logprobs most likely tokens {token id: log-prob}, most likely first,
    # under the distribution sampled from (tokens outside top-k / top-p are left out)
    top_logprobs: list[dict[int, float]] | None = None
    # [n_tokens - 1 - routed_experts_start, num_moe_layers, top_k]: row t = experts used when token
    # (routed_experts_start + t) was forwarded, prompt tokens included.
    routed_experts: np.ndarray | None = None
    routed_experts_start: int = 0
    routing_key: str | None = None  # store key the full-sequence routing was written under
    routing_error: str | None = None  # a failed store write, surfaced here and in the logs
    store_future: Future | None = field(default=None, repr=False)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    moe_layer_ids: list[int]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (sample 0)
    # why the request failed (e.g. a non-finite distribution): its unfinished samples end with finish_reason
    # "error" and no routing; None for a request that ran to its end
    error: str | None = None
