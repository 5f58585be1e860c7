"""Per-request generation options (vLLM-compatible names)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(slots=True)
class SamplingParams:
    """`logprobs=True` returns, per generated token, its log-probability under the distribution it
    was sampled from: softmax(logits / temperature) restricted to the top-k / top-p set and
    renormalised; for greedy (temperature 0) the plain log-softmax of the logits.
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
        """Raise ValueError naming the field (the caller adds the request index)."""
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", _num(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
             "must be -1 (off) or >= 1"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             f"must be an integer in [0, max_tokens={self.max_tokens}]"),
            ("top_logprobs", isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
            ("presence_penalty", _num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "must be in [-2, 2]"),
            ("frequency_penalty", _num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "must be in [-2, 2]"),
            ("repetition_penalty", _num(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer or None"),
            ("stop_token_ids", all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
             f"must be token ids in [0, {vocab_size})"),
            ("stop", isinstance(self.stop, list) and all(isinstance(x, str) and x for x in self.stop),
             "must be a list of non-empty strings"),
            ("routed_experts_start", isinstance(self.routed_experts_start, int) and self.routed_experts_start >= 0,
             "must be an integer >= 0"),
            ("store_routing", isinstance(self.store_routing, bool), "must be a bool"),
            ("skip_special_tokens", isinstance(self.skip_special_tokens, bool), "must be a bool"),
            ("rollout_id", self.rollout_id is None or _storable_key(self.rollout_id),
             "must be a non-empty UTF-8 string without NUL"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _storable_key(key) -> bool:
    """Every store backend can hold it (the store encodes path tricks; NUL and lone surrogates it cannot)."""
    if not isinstance(key, str) or not key or "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
