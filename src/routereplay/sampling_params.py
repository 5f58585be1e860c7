"""Per-request generation options (vLLM-compatible names)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_N = 128  # OpenAI's limit on samples per prompt
# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): logits / T would overflow float32 long before T = 0.
SAMPLING_EPS = 1e-5
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Logits (|x| < ~1e3 in practice) divided or multiplied by a penalty in this range stay far inside float32.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)


@dataclass(slots=True)
class SamplingParams:
    """`logprobs=True` returns, per generated token, its log-probability under the distribution it
    was sampled from: softmax(logits / temperature) restricted to the top-k / top-p set and
    renormalised; for greedy (temperature below SAMPLING_EPS, e.g. 0) the plain log-softmax of the logits.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    # EOS, stop_token_ids and stop strings cannot end a completion before it has this many tokens: their
    # tokens are masked out of the distribution sampled from (log-probs included), as in vLLM
    min_tokens: int = 0
    # Penalties (vLLM / OpenAI semantics) shape the distribution sampled from, so the log-probs include them:
    # presence subtracts once per token present in the output, frequency once per occurrence; repetition
    # divides positive / multiplies negative logits of tokens in the prompt or the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    # Stop strings (needs the model's tokenizer): the completion ends with the token that completes
    # one; token_ids and routing keep that token, `text` ends before the string (as in vLLM).
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # keep the stop string at the end of `text`
    skip_special_tokens: bool = True  # leave special tokens out of `text` (and of stop-string matching)
    ignore_eos: bool = False
    logprobs: bool = True
    # also the N most likely tokens at each generated position (same distribution; vLLM's logprobs=N)
    top_logprobs: int = 0
    # vLLM's prompt_logprobs: None = off; N >= 0 = per prompt token its log-prob under the plain log-softmax of
    # the raw logits at the position before it (no temperature, penalties, top-k / top-p: vLLM V1), plus the N
    # most likely tokens there (RequestOutput.prompt_logprobs). Such a request skips the prefix cache (vLLM V1).
    prompt_logprobs: int | None = None
    return_routed_experts: bool | None = None  # None: the engine's routing_replay.return_routed_experts
    routed_experts_start: int = 0  # skip the first S rows (the client already holds them)
    rollout_id: str | None = None  # store key; defaults to the request id
    store_routing: bool = True  # False: keep this request's routing out of the store (evaluation, health checks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # vLLM accepts one string
            self.stop = [self.stop]
        self.stop = [] if self.stop is None else self.stop  # None: none, as in vLLM and SGLang
        self.stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if self.logprobs is None:  # vLLM: None = no log-probs, N = the sampled token's and the top N
            self.logprobs = False
        elif isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool):
            self.logprobs, self.top_logprobs = True, self.logprobs

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the field (the caller adds the request index). Checked in order, each
        check relying on the earlier ones (min_tokens compares with an integer max_tokens)."""
        checks: list[tuple[str, Callable[[], bool], str]] = [
            ("n", lambda: _int(self.n, 1, MAX_N), f"must be an integer in [1, {MAX_N}]"),
            ("temperature", lambda: _real(self.temperature) and self.temperature >= 0,
             f"must be a number >= 0, finite in float32 (below {SAMPLING_EPS}: greedy)"),
            ("top_p", lambda: _real(self.top_p) and 0 < self.top_p <= 1 and np.float32(self.top_p) > 0,
             "must be in (0, 1] and not 0 in float32"),
            ("top_k", lambda: _int(self.top_k, -1, vocab_size),
             f"must be -1 or 0 (off) or an integer in [1, vocab size {vocab_size}]"),
            ("max_tokens", lambda: _int(self.max_tokens, 1), "must be an integer >= 1"),
            ("min_tokens", lambda: _int(self.min_tokens, 0, self.max_tokens),
             f"must be an integer in [0, max_tokens={self.max_tokens}]"),
            ("top_logprobs", lambda: _int(self.top_logprobs, 0, MAX_TOP_LOGPROBS),
             f"must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
            ("prompt_logprobs", lambda: self.prompt_logprobs is None or _int(self.prompt_logprobs, 0, MAX_TOP_LOGPROBS),
             f"must be None or an integer in [0, {MAX_TOP_LOGPROBS}]"),
            ("presence_penalty", lambda: _real(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "must be in [-2, 2]"),
            ("frequency_penalty", lambda: _real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "must be in [-2, 2]"),
            # Logits divided (or multiplied) by it must stay finite in float32: a denormal penalty made them inf.
            ("repetition_penalty", lambda: (_real(self.repetition_penalty)
                                            and REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty
                                            <= REPETITION_PENALTY_RANGE[1]),
             f"must be in [{REPETITION_PENALTY_RANGE[0]:g}, {REPETITION_PENALTY_RANGE[1]:g}]"),
            ("seed", lambda: self.seed is None or _int(self.seed), "must be a 64-bit integer or None"),
            ("stop_token_ids", lambda: isinstance(self.stop_token_ids, list)
             and all(_int(t, 0, vocab_size - 1) for t in self.stop_token_ids),
             f"must be a list of token ids in [0, {vocab_size})"),
            ("stop", lambda: isinstance(self.stop, list) and all(isinstance(x, str) and x for x in self.stop),
             "must be a list of non-empty strings"),
            ("routed_experts_start", lambda: _int(self.routed_experts_start, 0), "must be an integer >= 0"),
            ("return_routed_experts", lambda: self.return_routed_experts is None
             or isinstance(self.return_routed_experts, bool), "must be a bool or None"),
            *((name, lambda name=name: isinstance(getattr(self, name), bool), "must be a bool") for name in (
                "logprobs", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "store_routing")),
            ("rollout_id", lambda: self.rollout_id is None or client_key_error(self.rollout_id) is None,
             client_key_error(self.rollout_id) or ""),
        ]
        for name, ok, why in checks:
            if not ok():
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")


def _int(x, lo: int = INT64_MIN, hi: int = INT64_MAX) -> bool:
    """An integer (a bool is not one) in [lo, hi], within int64: it becomes a torch.long or a C integer."""
    return isinstance(x, int) and not isinstance(x, bool) and max(lo, INT64_MIN) <= x <= min(hi, INT64_MAX)


def _real(x) -> bool:
    """A number (not a bool) that is finite in float32, the precision the sampler works in."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return abs(float(x)) <= FLOAT32_MAX  # False for NaN, inf and ints beyond float64
    except OverflowError:
        return False


def client_key_error(key) -> str | None:
    """Why ``key`` cannot be a client's rollout id, or None. Every store backend must hold it (the store
    encodes path tricks; NUL and lone surrogates it cannot), and it must not end in ``/<digits>``: that
    suffix is reserved for the sample and prompt indexes of derived keys (``routing_key``), so no client
    id can name another request's key."""
    if not isinstance(key, str) or not key:
        return "must be a non-empty string"
    if "\x00" in key:
        return "must not contain NUL characters"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid unicode (lone surrogate)"
    head, sep, last = key.rpartition("/")
    if sep and last.isascii() and last.isdigit():
        return f"must not end in '/{last}': '/<number>' suffixes are the sample and prompt indexes of stored keys"
    return None


def routing_key(rollout_id: str, n: int, sample: int, prompt_index: int | None = None) -> str:
    """The store key of one sample: ``R`` (one prompt, n=1), ``R/i`` (sample i of n > 1), ``R/j/i`` (sample i
    of prompt j of a batch sharing one rollout id). Client ids never end in ``/<digits>``
    (``client_key_error``), so distinct (id, prompt, sample) triples never share a key."""
    if prompt_index is not None:
        return f"{rollout_id}/{prompt_index}/{sample}"
    return rollout_id if n == 1 else f"{rollout_id}/{sample}"


def cut_at_stop(text: str, stop: list[str], final: bool = True, include: bool = False) -> str:
    """The text a client sees: everything before the first stop string (through it with ``include``);
    while the completion still runs (``final=False``), also without a tail that may yet grow into a
    stop string."""
    found = [(i, x) for x in stop if (i := text.find(x)) >= 0]
    if found:
        start, hit = min(found)
        return text[: start + (len(hit) if include else 0)]
    if final:
        return text
    hold = max((k for x in stop for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
    return text[: len(text) - hold]


@dataclass(frozen=True, slots=True)
class WireName:
    """What one SamplingParams field is called on the wire: the OpenAI / vLLM request field, SGLang's
    ``sampling_params`` key (None: that protocol spells it elsewhere, or has no such field). The server
    derives both protocols' request fields and the field named in an error from this table, so a new
    sampling parameter is one field, one check in ``validate`` and one row here."""

    field: str
    openai: str | None
    sglang: str | None


WIRE_NAMES = tuple(WireName(*row) for row in [
    ("n", "n", "n"),
    ("temperature", "temperature", "temperature"),
    ("top_p", "top_p", "top_p"),
    ("top_k", "top_k", "top_k"),
    ("max_tokens", "max_tokens", "max_new_tokens"),
    ("min_tokens", "min_tokens", "min_new_tokens"),
    ("presence_penalty", "presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty", "frequency_penalty"),
    ("repetition_penalty", "repetition_penalty", "repetition_penalty"),
    ("seed", "seed", "sampling_seed"),
    ("stop", "stop", "stop"),
    ("stop_token_ids", "stop_token_ids", "stop_token_ids"),
    ("include_stop_str_in_output", "include_stop_str_in_output", "no_stop_trim"),
    ("skip_special_tokens", "skip_special_tokens", "skip_special_tokens"),
    ("ignore_eos", "ignore_eos", "ignore_eos"),
    # routing: top-level fields of /generate, request fields of OpenAI's
    ("return_routed_experts", "return_routed_experts", None),
    ("routed_experts_start", "routed_experts_start", None),
    ("rollout_id", "rollout_id", None),
    ("store_routing", "store_routing", None),
])
