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
    finish_reason: str | None  # None in a streaming delta (RequestOutput.finished False)
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
    # False: a streaming request's delta (``add_request(stream=True)``): ``outputs`` hold only the samples
    # with new tokens, each with just the tokens (log-probs, top log-probs) of this step, finish_reason None
    finished: bool = True
    # SamplingParams.prompt_logprobs (vLLM's field): one entry per prompt token, the first None (no context);
    # entry t = {prompt_token_ids[t]: its log-prob, then the prompt_logprobs most likely tokens, most likely
    # first} under the plain fp32 log-softmax of the raw logits at position t - 1 (no temperature, penalties,
    # top-k / top-p, as vLLM V1). Computed once (sample 0) and shared by the n samples. None when not asked
    # for, or when the request ended (abort, error) before its whole prompt was forwarded.
    prompt_logprobs: list[dict[int, float] | None] | None = None
