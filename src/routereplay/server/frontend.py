"""What every protocol's handlers share: the engine thread, the tokenizer, request limits, waiting for
outputs and their routing writes, and the service's state (weight version, metrics)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from routereplay.engine.llm_engine import LLMEngine, load_tokenizer
from routereplay.outputs import CompletionOutput, RequestOutput
from routereplay.sampling_params import WIRE_NAMES, SamplingParams, client_key_error
from routereplay.server.engine_thread import EngineThread, Job
from routereplay.server.options import ServerOptions
from routereplay.server.protocol import ApiError, engine_param

log = logging.getLogger("routereplay.server")

_WIRE = {w.field: w for w in WIRE_NAMES}


def wire_param(message: str, protocol: Literal["openai", "sglang"], prompt_field: str) -> str:
    """The request field an engine ``ValueError`` is about, spelled as ``protocol`` spells it."""
    name = engine_param(message, prompt_field)
    w = _WIRE.get(name)
    if w is None:
        return name
    if protocol == "openai":
        return w.openai or name
    return f"sampling_params.{w.sglang}" if w.sglang else name


def check_key(key: str, param: str) -> None:
    """A client's id (rollout_id, rid) must be a key no other request's derived keys can reach."""
    if (why := client_key_error(key)) is not None:
        raise ApiError(400, f"{param} {why}", param)


class Frontend:
    def __init__(self, engine: LLMEngine, served_model_name: str | None, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.thread = EngineThread(engine)  # the one thread that calls the engine
        self.model_name = served_model_name or engine.config.model
        self.aliases = {self.model_name, engine.config.model}
        self.tokenizer = load_tokenizer(engine.config.model)  # its own: the engine thread uses the engine's
        self.created = int(time.time())
        self.weight_version = "default"  # SGLang's: set by a weight update that names one, reported back

    # -- checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    def check_alive(self) -> None:
        if not self.thread.alive:
            raise ApiError(503, self.thread.failed or "the engine is not running", type="server_error")

    # -- text
    def decode(self, token_ids: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_length(self, size: int, param: str) -> None:
        """A text of ``size`` characters that cannot fit the context is refused before it is tokenized."""
        limit = self.options.max_chars_per_token * self.engine.config.max_model_len
        if size > limit:
            raise ApiError(400, f"{param}: {size} characters cannot fit max_model_len="
                           f"{self.engine.config.max_model_len} tokens (limit {limit} characters)", param)

    async def tokenize(self, texts: list[str], params: list[str]) -> list[list[int]]:
        """Token ids of each text, off the event loop."""
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", params[0])
        for text, param in zip(texts, params, strict=True):
            self.check_length(len(text), param)
        encoded = await asyncio.to_thread(self.tokenizer, texts)
        return [list(ids) for ids in encoded["input_ids"]]

    # -- running requests
    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.thread.submit(job)

    async def wait_all(self, jobs: list[Job], key_field: str = "rollout_id") -> dict[str, RequestOutput]:
        """Every job's output; an engine refusal (400: its rollout id is in flight) names ``key_field``.
        Whatever is unfinished when this ends (an error, a cancelled handler) is aborted."""
        done: dict[str, RequestOutput] = {}
        events = jobs[0].events
        try:
            while len(done) < len(jobs):
                kind, req_id, *rest = await events.get()
                if kind == "error":
                    message, status = rest
                    if status >= 500:
                        raise ApiError(status, message, type="server_error")
                    raise ApiError(status, message, key_field)
                if kind == "done":
                    if rest[0].error is not None:  # this request alone failed in the engine
                        raise ApiError(500, rest[0].error, type="server_error")
                    done[req_id] = rest[0]
        finally:
            for job in jobs:
                if job.request_id not in done:
                    self.thread.abort(job.request_id)
        return done

    async def finish_routing(self, outputs: list[CompletionOutput]) -> None:
        """Wait for the store writes of these outputs; a failure becomes ``routing_error``."""
        for c in outputs:
            if c.store_future is None:
                continue
            try:
                await asyncio.wrap_future(c.store_future)
            except Exception as e:
                c.routing_error = f"{type(e).__name__}: {e}"
                log.error("routing for key %r was not stored: %s", c.routing_key, c.routing_error)

    async def on_engine_thread(self, fn: Callable[[LLMEngine], Any]) -> tuple[Any, str | None]:
        """``fn(engine)`` run between two engine steps: (its result, None) or (None, the error)."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()
        self.thread.call(fn, lambda value, error: loop.call_soon_threadsafe(result.set_result, (value, error)))
        return await result

    # -- service state
    def metrics(self) -> str:
        """Prometheus text exposition."""
        snap = self.engine.stats()  # sizes and counters only: safe to read beside the engine thread
        rows: list[tuple[str, Literal["counter", "gauge"], str, int]] = [
            ("routereplay_requests_total", "counter", "Engine requests accepted (one per prompt).",
             snap["requests"]),
            ("routereplay_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
             snap["prompt_tokens"]),
            ("routereplay_generation_tokens_total", "counter", "Tokens generated.", snap["generation_tokens"]),
            ("routereplay_queue_depth", "gauge", "Sequences waiting or running in the engine, plus requests "
             "not yet taken by the engine thread.", snap["waiting"] + snap["running"] + self.thread.pending),
            ("routereplay_paused", "gauge", "1 while generation is paused (/pause_generation).",
             int(self.thread.paused)),
            ("routereplay_free_kv_blocks", "gauge", "KV cache blocks free (cached prefixes count as free).",
             snap["free_kv_blocks"]),
            ("routereplay_preemptions_total", "counter", "Sequences preempted (KV freed, recomputed later).",
             snap["preemptions"]),
            ("routereplay_store_queue_depth", "gauge", "Routing store writes accepted and not finished.",
             snap["store_queue_depth"]),
            ("routereplay_store_written_total", "counter", "Routing store writes that succeeded.",
             snap["store_written"]),
            ("routereplay_store_errors_total", "counter", "Routing store writes that failed or were refused.",
             snap["store_errors"]),
        ]
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
