"""OpenAI-compatible rollout server: FastAPI handlers on the event loop (here), one engine thread
(``engine_thread.py``), request bodies and errors (``protocol.py``).

Threads. Handlers (uvicorn's event loop) parse, tokenize, validate and format. ONE engine thread
owns the LLMEngine, which is not thread-safe: it alone calls add_request / step / abort, and runs
the control calls (weight sync, cache flush, pause) between two steps. Handlers
hand work over through a queue (the thread blocks on it when idle); the thread answers through
``loop.call_soon_threadsafe`` into one asyncio.Queue per HTTP request. Handlers do call
``engine.validate``: it only reads the engine's immutable configuration.

Streaming. A streaming request is added with ``stream=True``: ``LLMEngine.step()`` then also returns
what each step added to its samples (``RequestOutput.finished`` False), which the engine thread pushes
to the handler; the deltas add up to exactly the final output. The server uses only the engine's
public methods (``add_request``, ``step``, ``abort``, ``stats``, ``update_weights_from_checkpoint``, ...).

Routing. A response (or a stream's final chunk) is sent only after its routing write to the store
finished, so a client holding a response can read the store at once. A failed write is logged,
counted, and reported in the choice's ``routing_error``; the request itself still succeeds.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from routereplay.config import EngineConfig
from routereplay.engine.llm_engine import LLMEngine, load_tokenizer
from routereplay.outputs import CompletionOutput, RequestOutput
from routereplay.routing import encode, to_sglang
from routereplay.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, client_key_error, cut_at_stop
from routereplay.server.engine_thread import EngineThread, Job
from routereplay.server.options import ServerOptions
from routereplay.server.protocol import (
    SGLANG_NO_EFFECT,
    SGLANG_SAMPLING,
    UNSUPPORTED,
    AbortBody,
    ApiError,
    ChatBody,
    ChatMessage,
    CompletionBody,
    DistributedWeightsBody,
    GenerateBody,
    GroupNameBody,
    PauseBody,
    SamplingBody,
    UpdateWeightsBody,
    WeightGroupBody,
    engine_param,
    parse_body,
    read_body,
    validation_error,
)
from routereplay.weight_sync import make_group, parse_dtype, receive_weights

log = logging.getLogger("routereplay.server")

__all__ = ["ApiError", "EngineThread", "ServerOptions", "create_app", "serve"]


# ---- the service ----------------------------------------------------------------------------------------
def _sse(obj: Mapping[str, Any] | str) -> str:
    # allow_nan=False: a NaN that got this far fails loudly instead of being sent as invalid JSON
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, allow_nan=False)}\n\n"


def _check_key(key: str, param: str) -> None:
    """A client's id (rollout_id, rid) must be a key no other request's derived keys can reach."""
    if (why := client_key_error(key)) is not None:
        raise ApiError(400, f"{param} {why}", param)


class _Service:
    def __init__(self, engine: LLMEngine, served_model_name: str | None, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.thread = EngineThread(engine)  # the one thread that calls the engine
        self.model_name = served_model_name or engine.config.model
        self.aliases = {self.model_name, engine.config.model}
        self.tokenizer = load_tokenizer(engine.config.model)  # its own: the engine thread uses the engine's
        self.created = int(time.time())
        self.weight_groups: dict[str, Any] = {}  # group name -> process group shared with a trainer

    # -- shared pieces
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    def check_alive(self) -> None:
        if not self.thread.alive:
            raise ApiError(503, self.thread.failed or "the engine is not running", type="server_error")

    def decode(self, token_ids: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def tokenize(self, texts: list[str], params: list[str]) -> list[list[int]]:
        """Token ids of each text, off the event loop; a text too long to fit the context is refused first."""
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", params[0])
        limit = self.options.max_chars_per_token * self.engine.config.max_model_len
        for text, param in zip(texts, params, strict=True):
            if len(text) > limit:
                raise ApiError(400, f"{param}: {len(text)} characters cannot fit max_model_len="
                               f"{self.engine.config.max_model_len} tokens (limit {limit} characters)", param)
        encoded = await asyncio.to_thread(self.tokenizer, texts)
        return [list(ids) for ids in encoded["input_ids"]]

    async def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        msgs = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                       f"messages[{i}].content")
                    texts.append(part["text"])
                content = "".join(texts)
            msgs.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
        limit = self.options.max_chars_per_token * self.engine.config.max_model_len
        if (size := sum(len(m["content"]) for m in msgs)) > limit:
            raise ApiError(400, f"messages: {size} characters cannot fit max_model_len="
                           f"{self.engine.config.max_model_len} tokens (limit {limit} characters)", "messages")
        try:
            ids = await asyncio.to_thread(self.tokenizer.apply_chat_template, msgs, add_generation_prompt=True,
                                          tokenize=True)
        except Exception as e:  # template errors (jinja raises many types)
            raise ApiError(400, f"messages: the chat template failed: {e}", "messages") from None
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return list(ids)

    def build_jobs(self, body: SamplingBody, prompts: list[tuple[list[int], str | None]], logprobs: int | None,
                   max_tokens: int | None, prompt_field: str, rid: str, max_tokens_field: str) -> list[Job]:
        """Validate every prompt, then make the engine requests (nothing is queued on error). The store keys:
        ``rollout_id`` (else the response id) for one prompt, ``rollout_id/j/i`` for a batch (routing_key)."""
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if not (isinstance(stop, list) and all(isinstance(x, str) and x for x in stop)):
            raise ApiError(400, f"stop must be a non-empty string or a list of them, got {body.stop!r}", "stop")
        for name, default in UNSUPPORTED.items():
            value = getattr(body, name, None)
            if not (value is None or value is False or value in ("", [], {})
                    or (type(value) in (int, float) and value == default)):
                raise ApiError(400, f"{name}={value!r} is not supported by this server", name)
        if body.rollout_id is not None:
            _check_key(body.rollout_id, "rollout_id")
        # OpenAI's user names an end user, not a rollout: two requests of one user must not share a key
        base = body.rollout_id or rid
        batch = len(prompts) > 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for j, (ids, text) in enumerate(prompts):
            limit = max_tokens
            if limit is None:  # as OpenAI / vLLM: 16 for completions, the rest of the context for chat
                limit = max(1, self.engine.config.max_model_len - len(ids)) if prompt_field == "messages" else 16
            params = SamplingParams(
                n=body.n,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=-1 if body.top_k is None else body.top_k,
                max_tokens=limit,
                seed=body.seed,
                stop_token_ids=list(body.stop_token_ids or []),
                stop=stop,
                include_stop_str_in_output=body.include_stop_str_in_output,
                skip_special_tokens=body.skip_special_tokens,
                min_tokens=body.min_tokens,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                ignore_eos=body.ignore_eos,
                logprobs=logprobs is not None,
                top_logprobs=logprobs or 0,
                return_routed_experts=body.return_routed_experts,
                routed_experts_start=body.routed_experts_start,
                store_routing=body.store_routing,
                rollout_id=base,
            )
            try:
                self.engine.validate(ids, params)
            except ValueError as e:
                where = f"{prompt_field}[{j}]: " if batch else ""
                param = engine_param(str(e), prompt_field)
                raise ApiError(400, f"{where}{e}", max_tokens_field if param == "max_tokens" else param) from None
            jobs.append(Job(f"{rid}-{j}", ids, params, text, body.stream, loop, events, j if batch else None))
        return jobs

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

    def routing_fields(self, c: CompletionOutput) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if c.routed_experts is not None:
            d["routed_experts"] = encode(c.routed_experts)
        if self.engine.stores_routing:
            d["routing_key"] = c.routing_key
            d["routing_error"] = c.routing_error
        return d

    def logprobs_obj(self, chat: bool, token_ids: list[int], lps: list[float],
                     tops: list[dict[int, float]] | None, offset: int = 0) -> dict:
        """OpenAI's ``logprobs`` object (chat or completions form); ``tops``: the top log-probs per token."""
        toks = [self.token_str(t) for t in token_ids]
        if chat:
            def entry(s: str, lp: float) -> dict[str, Any]:
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            return {"content": [{**entry(s, lp), "top_logprobs": [entry(self.token_str(t), x) for t, x in top.items()]}
                                for s, lp, top in zip(toks, lps, tops or [{}] * len(toks), strict=True)]}
        offsets = []
        for s in toks:
            offsets.append(offset)
            offset += len(s)
        top_obj = None if tops is None else [{self.token_str(t): x for t, x in top.items()} for top in tops]
        return {"tokens": toks, "token_logprobs": list(lps), "top_logprobs": top_obj, "text_offset": offsets}

    async def run(self, body: SamplingBody, prompts: list[tuple[list[int], str | None]], *, chat: bool,
                  logprobs: int | None, max_tokens: int | None,
                  max_tokens_field: str = "max_tokens") -> JSONResponse | StreamingResponse:
        """``logprobs``: None = no log-probs, N = each token's and the N most likely at its position."""
        self.check_alive()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        jobs = self.build_jobs(body, prompts, logprobs, max_tokens, "messages" if chat else "prompt", rid,
                               max_tokens_field)
        for job in jobs:
            self.thread.submit(job)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(jobs, rid, chat, include_usage),
                                     media_type="text/event-stream")
        return JSONResponse(await self._complete(jobs, rid, chat))

    async def _wait_all(self, jobs: list[Job], key_field: str = "rollout_id") -> dict[str, RequestOutput]:
        """Every job's output; an engine refusal (400: its rollout id is in flight) names ``key_field``."""
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

    def _head(self, rid: str, chat: bool, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name}

    async def _complete(self, jobs: list[Job], rid: str, chat: bool) -> dict[str, Any]:
        done = await self._wait_all(jobs)
        outs = [done[job.request_id] for job in jobs]
        await self.finish_routing([c for o in outs for c in o.outputs])
        choices = []
        n = jobs[0].params.n
        for j, out in enumerate(outs):
            for c in out.outputs:
                text = self.decode(c.token_ids, jobs[0].params)
                if c.stop_reason is not None:
                    text = cut_at_stop(text, [c.stop_reason], include=jobs[0].params.include_stop_str_in_output)
                lp = None if c.logprobs is None else self.logprobs_obj(chat, c.token_ids, c.logprobs, c.top_logprobs)
                choice: dict[str, Any] = {"index": j * n + c.index}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                choice.update(logprobs=lp, finish_reason=c.finish_reason, token_ids=c.token_ids,
                              prompt_token_ids=out.prompt_token_ids, **self.routing_fields(c))
                choices.append(choice)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        completion_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return {**self._head(rid, chat, False), "choices": choices, "usage": usage}

    async def _stream(self, jobs: list[Job], rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        n = jobs[0].params.n
        index = {job.request_id: j for j, job in enumerate(jobs)}
        tokens: dict[int, list[int]] = {}  # choice index -> token ids so far
        texts: dict[int, str] = {}  # choice index -> text sent so far
        finished: set[str] = set()
        usage = {"prompt_tokens": sum(len(job.prompt_token_ids) for job in jobs), "completion_tokens": 0}

        def chunk(ci: int, text: str, extra: dict[str, Any]) -> str:
            choice: dict[str, Any] = {"index": ci}
            if chat:
                choice["delta"] = {"content": text} if text else {}
            else:
                choice["text"] = text
            choice.update(extra)
            return _sse({**self._head(rid, chat, True), "choices": [choice]})

        stops, include = jobs[0].params.stop, jobs[0].params.include_stop_str_in_output

        def text_delta(ci: int, final: bool) -> str:
            # Stop strings: cut at one, and hold back a tail that may still become one.
            full = cut_at_stop(self.decode(tokens[ci], jobs[0].params), stops, final, include)
            sent = texts[ci]
            # Hold back an incomplete UTF-8 character until its last byte arrives.
            if not full.startswith(sent) or (full.endswith("\ufffd") and not final):
                return ""
            texts[ci] = full
            return full[len(sent) :]

        try:
            for j in range(len(jobs)):
                for i in range(n):
                    tokens[j * n + i], texts[j * n + i] = [], ""
                    if chat:
                        yield _sse({**self._head(rid, chat, True), "choices": [
                            {"index": j * n + i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}]})
            events = jobs[0].events
            while len(finished) < len(jobs):
                kind, req_id, *rest = await events.get()
                if kind == "done" and rest[0].error is not None:  # this request alone failed in the engine
                    kind, rest = "error", [rest[0].error, 500]
                if kind == "error":
                    yield _sse({"error": {"message": rest[0], "type": "server_error", "param": None,
                                          "code": rest[1]}})
                    return
                j = index[req_id]
                if kind == "delta":
                    i, new, lps, tops = rest
                    ci = j * n + i
                    offset = len(texts[ci])
                    tokens[ci].extend(new)
                    lp = self.logprobs_obj(chat, new, lps, tops, offset) if jobs[0].params.logprobs else None
                    yield chunk(ci, text_delta(ci, False), {"logprobs": lp, "finish_reason": None,
                                                            "token_ids": new})
                elif kind == "done":
                    out: RequestOutput = rest[0]
                    finished.add(req_id)
                    await self.finish_routing(out.outputs)
                    for c in out.outputs:
                        ci = j * n + c.index
                        tokens[ci] = list(c.token_ids)
                        usage["completion_tokens"] += len(c.token_ids)
                        yield chunk(ci, text_delta(ci, True), {
                            "logprobs": None, "finish_reason": c.finish_reason, "token_ids": [],
                            "prompt_token_ids": out.prompt_token_ids, **self.routing_fields(c)})
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield _sse({**self._head(rid, chat, True), "choices": [], "usage": usage})
            yield _sse("[DONE]")
        finally:  # a client that went away frees its sequences
            for job in jobs:
                if job.request_id not in finished:
                    self.thread.abort(job.request_id)

    # -- endpoints
    async def completions(self, body: CompletionBody) -> JSONResponse | StreamingResponse:
        self.check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [(ids, p) for ids in await self.tokenize([p], ["prompt"])]
        elif p and all(isinstance(x, str) for x in p):
            ids = await self.tokenize(p, [f"prompt[{j}]" for j in range(len(p))])
            prompts = list(zip(ids, p, strict=True))
        elif p and all(isinstance(x, list) for x in p):
            prompts = [(list(x), None) for x in p]
        else:
            prompts = [(list(p), None)]
        logprobs = body.logprobs  # an int (OpenAI); true means 0, false none
        if isinstance(logprobs, bool):
            logprobs = 0 if logprobs else None
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", "logprobs")
        return await self.run(body, prompts, chat=False, logprobs=logprobs, max_tokens=body.max_tokens)

    async def chat(self, body: ChatBody) -> JSONResponse | StreamingResponse:
        self.check_model(body.model)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
                           "top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        prompts = [(await self.chat_ids(body.messages), None)]
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self.run(body, prompts, chat=True, logprobs=logprobs, max_tokens=getattr(body, field),
                              max_tokens_field=field)

    async def generate(self, body: GenerateBody) -> dict[str, Any] | list[dict[str, Any]]:
        """SGLang's ``/generate``: ``text`` or ``input_ids`` (one prompt or a list), ``sampling_params`` with
        SGLang's names; routing as SGLang returns it (``meta_info.routed_experts``: base64 of int32 ids, rows
        from ``routed_experts_start_len``). A list comes back for a batch or ``sampling_params.n`` > 1, prompt
        by prompt, sample by sample. Every prompt is validated before any is queued."""
        self.check_alive()
        if body.stream:
            raise ApiError(400, "stream is not supported on /generate: use /v1/completions", "stream")
        if (body.text is None) == (body.input_ids is None):
            raise ApiError(400, "give exactly one of text and input_ids", "text")
        field = "text" if body.text is not None else "input_ids"
        if body.text is not None:
            batch = isinstance(body.text, list)
            texts = body.text if batch else [body.text]
            if not texts:
                raise ApiError(400, "text: an empty batch", "text")
            ids = await self.tokenize(texts, [f"text[{j}]" if batch else "text" for j in range(len(texts))])
            prompts = list(zip(ids, texts, strict=True))
        else:
            batch = bool(body.input_ids) and isinstance(body.input_ids[0], list)
            prompts = [(list(x), None) for x in (body.input_ids if batch else [body.input_ids])]
        if batch and not (body.rid is None or (isinstance(body.rid, list) and len(body.rid) == len(prompts))):
            raise ApiError(400, f"rid must be a list of {len(prompts)} ids for a batch of {len(prompts)}", "rid")
        if not batch and isinstance(body.rid, list):
            raise ApiError(400, "rid must be a string for one prompt", "rid")
        # each prompt's rid is its store key: one rid twice would have one prompt overwrite the other's routing
        rids = body.rid if isinstance(body.rid, list) else [body.rid] * len(prompts)
        first: dict[str, int] = {}
        for j, r in enumerate(rids):
            if r is not None and first.setdefault(r, j) != j:
                raise ApiError(400, f"rid[{j}]: {r!r} is also rid[{first[r]}]; each prompt needs its own", f"rid[{j}]")
        kwargs: dict[str, Any] = {"max_tokens": 128}  # SGLang's default
        for key, value in body.sampling_params.items():
            if key in SGLANG_NO_EFFECT:
                continue
            if key not in SGLANG_SAMPLING:
                raise ApiError(400, f"sampling_params.{key} is not supported; supported: "
                               f"{', '.join([*SGLANG_SAMPLING, *SGLANG_NO_EFFECT])}", f"sampling_params.{key}")
            kwargs[SGLANG_SAMPLING[key]] = value
        jobs, events = [], asyncio.Queue()
        for j, ((ids, text), rid) in enumerate(zip(prompts, rids, strict=True)):
            rid = rid or f"gen-{uuid.uuid4().hex}"
            try:
                _check_key(rid, f"rid[{j}]" if batch else "rid")
                if body.top_logprobs_num and not body.return_logprob:
                    raise ValueError("top_logprobs_num needs return_logprob=true")
                params = SamplingParams(**kwargs, logprobs=body.return_logprob, top_logprobs=body.top_logprobs_num,
                                        rollout_id=rid, return_routed_experts=body.return_routed_experts,
                                        routed_experts_start=body.routed_experts_start_len)
                self.engine.validate(ids, params)
            except (ValueError, TypeError) as e:  # TypeError: a value of the wrong type for its field
                name = engine_param(str(e), field)
                names = {v: k for k, v in SGLANG_SAMPLING.items()}
                param = f"sampling_params.{names[name]}" if name in names else {
                    "routed_experts_start": "routed_experts_start_len", "rollout_id": "rid",
                    "top_logprobs": "top_logprobs_num"}.get(name, name)
                where = f"{field}[{j}]: " if batch else ""
                raise ApiError(400, f"{where}{e}", param) from None
            # the engine's id is unique; a rid may come back once its earlier request ended (a later turn)
            jobs.append(Job(f"gen-{uuid.uuid4().hex}", ids, params, text, False, asyncio.get_running_loop(), events))
        for job in jobs:
            self.thread.submit(job)
        done = await self._wait_all(jobs, "rid")
        results = [result for job in jobs for result in await self._generate_results(body, job, done[job.request_id])]
        return results if batch or len(results) > 1 else results[0]

    async def _generate_results(self, body: GenerateBody, job: Job, out: RequestOutput) -> list[dict[str, Any]]:
        """SGLang's reply items for one prompt: one per sample."""
        await self.finish_routing(out.outputs)
        params, ids, rid = job.params, job.prompt_token_ids, job.params.rollout_id
        results = []
        for c in out.outputs:
            text = self.decode(c.token_ids, params)
            if c.stop_reason is not None:
                text = cut_at_stop(text, [c.stop_reason], include=params.include_stop_str_in_output)
            if c.finish_reason == "length":
                finish = {"type": "length", "length": len(c.token_ids)}
            elif c.finish_reason == "abort":
                finish = {"type": "abort", "message": "aborted by /abort_request"}
            else:
                finish = {"type": "stop", "matched": c.stop_reason if c.stop_reason is not None else c.token_ids[-1]}
            meta: dict[str, Any] = {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids),
                                    "completion_tokens": len(c.token_ids), "cached_tokens": out.num_cached_tokens}
            if body.return_logprob:
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
                if c.top_logprobs is not None:
                    meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in top.items()] for top in c.top_logprobs]
            if c.routed_experts is not None:
                if body.routed_experts_compact:  # ours: MoE layers only, as /v1/completions returns it
                    meta["routed_experts"] = encode(c.routed_experts)
                else:  # SGLang's: a slot per decoder layer, dense layers zero (what slime reshapes and indexes)
                    meta["routed_experts"] = to_sglang(c.routed_experts, out.moe_layer_ids,
                                                       self.engine.model_config.num_layers)
            if self.engine.stores_routing:
                meta.update(routing_key=c.routing_key, routing_error=c.routing_error)
            results.append({"text": text, "output_ids": c.token_ids, "meta_info": meta})
        return results

    async def health_generate(self) -> dict[str, Any]:
        """SGLang's /health_generate (slime's heartbeat): while requests run, a step that finished within the
        last second proves the engine works (a probe would queue behind them and miss the heartbeat's
        timeout); while paused (a weight sync) the engine thread's liveness stands in; otherwise one token
        is generated, stored nowhere."""
        self.check_alive()
        if self.thread.paused:
            return {"status": "ok", "checked": "paused"}
        if self.thread.snapshot["running"] and time.monotonic() - self.thread.last_step < 1.0:
            return {"status": "ok", "checked": "recent step"}
        params = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=False, return_routed_experts=False,
                                store_routing=False)
        job = Job(f"health-{uuid.uuid4().hex}", [0], params, None, False, asyncio.get_running_loop(),
                  asyncio.Queue())
        self.thread.submit(job)
        out = (await self._wait_all([job]))[job.request_id]
        return {"status": "ok", "checked": f"generated {len(out.outputs[0].token_ids)} token"}

    async def on_engine_thread(self, fn) -> tuple[Any, str | None]:
        """``fn(engine)`` run between two engine steps: (its result, None) or (None, the error)."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()
        self.thread.call(fn, lambda value, error: loop.call_soon_threadsafe(result.set_result, (value, error)))
        return await result

    async def flush_cache(self) -> dict[str, Any]:
        """Drop the prefix cache (SGLang's /flush_cache), e.g. after weights changed outside this server."""
        _, error = await self.on_engine_thread(lambda engine: engine.reset_prefix_cache())
        if error is not None:
            raise ApiError(503, error, type="server_error")
        return {"success": True}

    async def set_paused(self, paused: bool, mode: str = "in_place") -> dict[str, Any]:
        """While paused, requests are accepted and queued but no engine step runs. Returns once the step in
        progress, if any, has finished, and the requests in flight were handled by ``mode`` (``PauseBody``).
        With ``in_place`` they continue on whatever weights a sync in between installs."""
        def apply(engine: LLMEngine) -> None:
            if mode == "abort":
                self.thread.end_early("", every=True)
            elif mode == "retract":
                engine.retract()
            self.thread.paused = paused

        _, error = await self.on_engine_thread(apply)
        if error is not None:
            raise ApiError(503, error, type="server_error")
        return {"paused": paused}

    async def abort_request(self, body: AbortBody) -> dict[str, Any]:
        """SGLang's /abort_request (RL frameworks call it once a rollout batch has enough samples): the
        matching requests end at once and their callers get what was generated, finish_reason abort."""
        if not (body.abort_all or body.rid):
            raise ApiError(400, "give rid or abort_all=true", "rid")
        count, error = await self.on_engine_thread(lambda engine: self.thread.end_early(body.rid, body.abort_all))
        if error is not None:
            raise ApiError(503, error, type="server_error")
        return {"success": True, "aborted": count}

    async def update_weights_from_disk(self, body: UpdateWeightsBody) -> dict[str, Any]:
        """Sync weights from a checkpoint directory between two engine steps. Requests in flight keep
        going with the new weights from the next step on: pause sampling first to keep a rollout
        on one policy. The prefix cache is dropped (it was computed with the old weights)."""
        self.check_alive()
        if not self.options.weight_dir_allowed(body.model_path):
            # one answer whether the path exists or not: the error reveals nothing outside the allow-list
            raise ApiError(400, "model_path is not under a directory this server loads weights from "
                           "(--weight-dir)", "model_path")
        if not os.path.isdir(body.model_path):
            raise ApiError(400, f"model_path {body.model_path!r} is not a directory", "model_path")
        # names and shapes are checked before anything is written: on an error the old weights stay
        count, error = await self.on_engine_thread(
            lambda engine: engine.update_weights_from_checkpoint(body.model_path))
        if error is not None:
            raise ApiError(400, f"update_weights_from_disk: {error}", "model_path")
        return {"success": True, "num_tensors": count}

    async def init_weights_update_group(self, body: WeightGroupBody) -> dict[str, Any]:
        """Join a trainer's process group (blocks until every rank has joined; the engine keeps stepping)."""
        self.check_alive()
        if body.group_name in self.weight_groups:
            raise ApiError(400, f"group_name {body.group_name!r} exists already", "group_name")
        if body.backend == "nccl" and not self.engine.config.device.startswith("cuda"):
            raise ApiError(400, "backend nccl needs an engine on CUDA; use gloo", "backend")
        if not 0 < body.rank_offset < body.world_size:
            raise ApiError(400, f"rank_offset must be in [1, world_size), got {body.rank_offset}", "rank_offset")
        try:
            group = await asyncio.to_thread(make_group, body.master_address, body.master_port, body.rank_offset,
                                            body.world_size, body.group_name, body.backend,
                                            timeout_s=self.options.weight_group_timeout_s)
        except Exception as e:
            raise ApiError(400, f"init_weights_update_group: {type(e).__name__}: {e}", "master_address") from None
        self.weight_groups[body.group_name] = group
        return {"success": True, "message": f"joined {body.group_name!r} as rank {body.rank_offset}"}

    async def update_weights_from_distributed(self, body: DistributedWeightsBody) -> dict[str, Any]:
        """Receive the trainer's broadcast weights between two engine steps; a wrong name or shape is a 400
        after every broadcast was received and discarded: nothing written, the group still in step."""
        self.check_alive()
        group = self.weight_groups.get(body.group_name)
        if group is None:
            raise ApiError(400, f"group_name {body.group_name!r}: no such group (/init_weights_update_group)",
                           "group_name")
        if not len(body.names) == len(body.dtypes) == len(body.shapes):
            raise ApiError(400, "names, dtypes and shapes must have one entry per tensor", "names")
        try:
            dtypes = [parse_dtype(d) for d in body.dtypes]
        except ValueError as e:
            raise ApiError(400, str(e), "dtypes") from None
        count, error = await self.on_engine_thread(
            lambda engine: receive_weights(engine, group, body.names, dtypes, body.shapes))
        if error is not None:
            raise ApiError(400, f"update_weights_from_distributed: {error}", "names")
        return {"success": True, "num_tensors": count, "message": f"{count} tensors written"}

    async def destroy_weights_update_group(self, body: GroupNameBody) -> dict[str, Any]:
        group = self.weight_groups.pop(body.group_name, None)
        if group is None:
            raise ApiError(400, f"group_name {body.group_name!r}: no such group", "group_name")
        group.shutdown()
        return {"success": True}

    def models(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "routereplay",
                "root": self.engine.config.model, "max_model_len": self.engine.config.max_model_len}
        return {"object": "list", "data": [card]}

    def metrics(self) -> str:
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


class _RequireApiKey:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer <key>`` (vLLM's --api-key)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                                 type="authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _until_disconnected(request: Request) -> None:
    # Once the body is read, the next ASGI message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _endpoint(handler, model: type[BaseModel] | None, options: ServerOptions, watch: bool):
    """A route over ``handler``: the body is read with a size and time limit and parsed off the event loop
    (``parse_body``). ``watch``: the handler is cancelled when the client disconnects, which aborts its
    engine requests (a non-streaming reply nobody waits for); a stream watches its own client."""

    async def endpoint(request: Request) -> Any:
        if model is None:
            return await handler()
        raw = await read_body(request, options)
        body = await asyncio.to_thread(parse_body, model, raw, options)
        if not watch:
            return await handler(body)
        work = asyncio.ensure_future(handler(body))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            log.info("client disconnected: its requests were aborted")
            return Response(status_code=499)
        return work.result()

    endpoint.__name__ = handler.__name__
    return endpoint


def create_app(engine: LLMEngine, served_model_name: str | None = None,
               options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app over ``engine``; it starts the engine thread and closes the engine on shutdown."""
    options = options or ServerOptions()
    svc = _Service(engine, served_model_name, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.thread.start()
        log.info("serving %r (max_model_len %d, routing %s)", svc.model_name, engine.config.max_model_len,
                 engine.config.routing_replay.to_dict())
        try:
            yield
        finally:
            svc.thread.stop(timeout=options.shutdown_timeout_s)
            engine.close(timeout=options.shutdown_timeout_s)  # flushes the routing store writer
            if engine.stores_routing:
                stats = engine.stats()
                log.info("engine closed: %d routing writes stored, %d failed", stats["store_written"],
                         stats["store_errors"])
            else:
                log.info("engine closed")

    app = FastAPI(title="routereplay", lifespan=lifespan)
    app.state.service = svc
    if options.api_key is not None:
        app.add_middleware(_RequireApiKey, api_key=options.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def pause_generation(body: PauseBody) -> dict[str, Any]:
        return await svc.set_paused(True, body.mode)

    async def continue_generation() -> dict[str, Any]:
        return await svc.set_paused(False)

    async def models() -> dict[str, Any]:
        return svc.models()

    # Endpoints that hand their body (if any) to the service, and whether a disconnect aborts them;
    # response_model=None: the handlers return dicts or responses as they are.
    for methods, path, handler, body, watch in [
        (["POST"], "/v1/completions", svc.completions, CompletionBody, True),
        (["POST"], "/v1/chat/completions", svc.chat, ChatBody, True),
        (["POST"], "/generate", svc.generate, GenerateBody, True),
        (["GET", "POST"], "/flush_cache", svc.flush_cache, None, False),  # SGLang takes both; some clients GET
        (["POST"], "/abort_request", svc.abort_request, AbortBody, False),
        (["POST"], "/pause_generation", pause_generation, PauseBody, False),  # an empty body: mode abort
        (["POST"], "/continue_generation", continue_generation, None, False),
        (["POST"], "/init_weights_update_group", svc.init_weights_update_group, WeightGroupBody, False),
        (["POST"], "/update_weights_from_distributed", svc.update_weights_from_distributed,
         DistributedWeightsBody, False),
        (["POST"], "/destroy_weights_update_group", svc.destroy_weights_update_group, GroupNameBody, False),
        (["POST"], "/update_weights_from_disk", svc.update_weights_from_disk, UpdateWeightsBody, False),
        (["GET"], "/health_generate", svc.health_generate, None, False),
        (["GET"], "/v1/models", models, None, False),
    ]:
        app.add_api_route(path, _endpoint(handler, body, options, watch), methods=methods, response_model=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        if svc.thread.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "message": svc.thread.failed or "not started"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(svc.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          log_level: str = "info", options: ServerOptions | None = None) -> None:
    """Build the engine and run uvicorn until SIGINT/SIGTERM; the engine is closed on the way out, within
    about ``options.shutdown_timeout_s`` twice (open connections, then the engine and the store)."""
    import uvicorn

    options = options or ServerOptions()
    engine = LLMEngine(config)
    try:
        app = create_app(engine, served_model_name, options)
        uvicorn.run(app, host=host, port=port, log_config=None, log_level=log_level,
                    timeout_graceful_shutdown=options.shutdown_timeout_s)
    finally:
        engine.close(timeout=options.shutdown_timeout_s)
