"""OpenAI's API (vLLM's extensions included): /v1/completions, /v1/chat/completions, /v1/models, streamed
or not, with routing in every choice."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from routereplay.outputs import CompletionOutput, RequestOutput
from routereplay.routing import encode
from routereplay.sampling_params import MAX_TOP_LOGPROBS, WIRE_NAMES, SamplingParams, cut_at_stop
from routereplay.server.engine_thread import Job
from routereplay.server.frontend import Frontend, check_key, wire_param
from routereplay.server.protocol import ApiError, ChatBody, ChatMessage, CompletionBody, SamplingBody


def _sse(obj: Mapping[str, Any] | str) -> str:
    # allow_nan=False: a NaN that got this far fails loudly instead of being sent as invalid JSON
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, allow_nan=False)}\n\n"


class OpenAI:
    def __init__(self, front: Frontend) -> None:
        self.front = front

    # -- endpoints
    async def completions(self, body: CompletionBody) -> JSONResponse | StreamingResponse:
        front = self.front
        front.check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [(ids, p) for ids in await front.tokenize([p], ["prompt"])]
        elif p and all(isinstance(x, str) for x in p):
            ids = await front.tokenize(p, [f"prompt[{j}]" for j in range(len(p))])
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
        return await self._run(body, prompts, chat=False, logprobs=logprobs, max_tokens_field="max_tokens")

    async def chat(self, body: ChatBody) -> JSONResponse | StreamingResponse:
        self.front.check_model(body.model)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
                           "top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        prompts = [(await self._chat_ids(body.messages), None)]
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self._run(body, prompts, chat=True, logprobs=logprobs, max_tokens_field=field)

    def models(self) -> dict[str, Any]:
        front = self.front
        card = {"id": front.model_name, "object": "model", "created": front.created, "owned_by": "routereplay",
                "root": front.engine.config.model, "max_model_len": front.engine.config.max_model_len}
        return {"object": "list", "data": [card]}

    # -- requests
    async def _chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        tokenizer = self.front.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
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
        self.front.check_length(sum(len(m["content"]) for m in msgs), "messages")
        try:
            ids = await asyncio.to_thread(tokenizer.apply_chat_template, msgs, add_generation_prompt=True,
                                          tokenize=True)
        except Exception as e:  # template errors (jinja raises many types)
            raise ApiError(400, f"messages: the chat template failed: {e}", "messages") from None
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return list(ids)

    def _jobs(self, body: SamplingBody, prompts: list[tuple[list[int], str | None]], logprobs: int | None,
              chat: bool, rid: str, max_tokens_field: str, echo: bool) -> list[Job]:
        """Validate every prompt, then make the engine requests (nothing is queued on error). The store keys:
        ``rollout_id`` (else the response id) for one prompt, ``rollout_id/j/i`` for a batch (routing_key)."""
        for name, default in body.UNSUPPORTED.items():
            value = getattr(body, name, None)
            if not (value is None or value is False or value in ("", [], {})
                    or (type(value) in (int, float) and value == default)):
                raise ApiError(400, f"{name}={value!r} is not supported by this server", name)
        if body.rollout_id is not None:
            check_key(body.rollout_id, "rollout_id")
        # the sampling fields as WIRE_NAMES spells them; unset ones keep SamplingParams' defaults
        given = {w.field: getattr(body, w.openai) for w in WIRE_NAMES
                 if w.openai and getattr(body, w.openai) is not None}
        given["max_tokens"] = getattr(body, max_tokens_field)
        # OpenAI's user names an end user, not a rollout: two requests of one user must not share a key
        given["rollout_id"] = body.rollout_id or rid
        batch = len(prompts) > 1
        if echo and body.stream:
            raise ApiError(400, "echo is not supported with stream", "echo")
        prompt_logprobs = logprobs if echo and logprobs is not None else None  # echo's prompt log-probs
        front, loop, events = self.front, asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for j, (ids, text) in enumerate(prompts):
            limit = given["max_tokens"]
            if limit is None:  # as OpenAI / vLLM: 16 for completions, the rest of the context for chat
                limit = max(1, front.engine.config.max_model_len - len(ids)) if chat else 16
            try:
                params = SamplingParams(**{**given, "max_tokens": limit}, logprobs=logprobs is not None,
                                        top_logprobs=logprobs or 0, prompt_logprobs=prompt_logprobs)
                front.engine.validate(ids, params)
            except (ValueError, TypeError) as e:  # TypeError: a value of the wrong type for its field
                where = f"{'messages' if chat else 'prompt'}[{j}]: " if batch else ""
                param = wire_param(str(e), "openai", "messages" if chat else "prompt")
                raise ApiError(400, f"{where}{e}", max_tokens_field if param == "max_tokens" else param) from None
            jobs.append(Job(f"{rid}-{j}", ids, params, text, body.stream, loop, events, j if batch else None))
        return jobs

    async def _run(self, body: SamplingBody, prompts: list[tuple[list[int], str | None]], *, chat: bool,
                   logprobs: int | None, max_tokens_field: str) -> JSONResponse | StreamingResponse:
        """``logprobs``: None = no log-probs, N = each token's and the N most likely at its position."""
        self.front.check_alive()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        echo = not chat and body.echo  # completions: the prompt's tokens and log-probs come first
        jobs = self._jobs(body, prompts, logprobs, chat, rid, max_tokens_field, echo)
        self.front.submit(jobs)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(jobs, rid, chat, include_usage), media_type="text/event-stream")
        return JSONResponse(await self._complete(jobs, rid, chat, echo))

    # -- replies
    def _routing_fields(self, c: CompletionOutput) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if c.routed_experts is not None:
            d["routed_experts"] = encode(c.routed_experts)
        if self.front.engine.stores_routing:
            d["routing_key"] = c.routing_key
            d["routing_error"] = c.routing_error
        return d

    def _logprobs_obj(self, chat: bool, token_ids: list[int], lps: list[float],
                      tops: list[dict[int, float]] | None, offset: int = 0) -> dict:
        """OpenAI's ``logprobs`` object (chat or completions form); ``tops``: the top log-probs per token."""
        token_str = self.front.token_str
        toks = [token_str(t) for t in token_ids]
        if chat:
            def entry(s: str, lp: float) -> dict[str, Any]:
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            return {"content": [{**entry(s, lp), "top_logprobs": [entry(token_str(t), x) for t, x in top.items()]}
                                for s, lp, top in zip(toks, lps, tops or [{}] * len(toks), strict=True)]}
        offsets = []
        for s in toks:
            offsets.append(offset)
            offset += len(s)
        top_obj = None if tops is None else [
            None if top is None else {token_str(t): x for t, x in top.items()} for top in tops]
        return {"tokens": toks, "token_logprobs": list(lps), "top_logprobs": top_obj, "text_offset": offsets}

    def _echo_logprobs(self, out: RequestOutput, c: CompletionOutput) -> dict:
        """Completions' ``logprobs`` over prompt + completion: OpenAI's ``echo`` with vLLM's prompt log-probs
        (``null`` for the first prompt token, each prompt token's dict holds it and the top N)."""
        prompt, pl = out.prompt_token_ids, out.prompt_logprobs
        lps = [None] + [pl[t][prompt[t]] for t in range(1, len(prompt))] + list(c.logprobs)
        tops = None
        if c.top_logprobs is not None:
            tops = [None] + [pl[t] for t in range(1, len(prompt))] + list(c.top_logprobs)
        return self._logprobs_obj(False, prompt + c.token_ids, lps, tops)

    def _head(self, rid: str, chat: bool, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.front.model_name}

    async def _complete(self, jobs: list[Job], rid: str, chat: bool, echo: bool) -> dict[str, Any]:
        front = self.front
        done = await front.wait_all(jobs)
        outs = [done[job.request_id] for job in jobs]
        await front.finish_routing([c for o in outs for c in o.outputs])
        params, n = jobs[0].params, jobs[0].params.n
        choices = []
        for j, out in enumerate(outs):
            for c in out.outputs:
                text = front.decode(c.token_ids, params)
                if c.stop_reason is not None:
                    text = cut_at_stop(text, [c.stop_reason], include=params.include_stop_str_in_output)
                if echo:  # the prompt comes first, its log-probs too (the first token has none)
                    prompt_text = jobs[j].prompt if jobs[j].prompt is not None else front.decode(
                        out.prompt_token_ids, params)
                    text = prompt_text + text
                    lp = None if c.logprobs is None else self._echo_logprobs(out, c)
                else:
                    lp = None if c.logprobs is None else self._logprobs_obj(chat, c.token_ids, c.logprobs,
                                                                            c.top_logprobs)
                choice: dict[str, Any] = {"index": j * n + c.index}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                choice.update(logprobs=lp, finish_reason=c.finish_reason, token_ids=c.token_ids,
                              prompt_token_ids=out.prompt_token_ids, **self._routing_fields(c))
                choices.append(choice)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        completion_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return {**self._head(rid, chat, False), "choices": choices, "usage": usage}

    async def _stream(self, jobs: list[Job], rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        front, params = self.front, jobs[0].params
        n = params.n
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

        def text_delta(ci: int, final: bool) -> str:
            # Stop strings: cut at one, and hold back a tail that may still become one.
            full = cut_at_stop(front.decode(tokens[ci], params), params.stop, final, params.include_stop_str_in_output)
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
                    lp = self._logprobs_obj(chat, new, lps, tops, offset) if params.logprobs else None
                    yield chunk(ci, text_delta(ci, False), {"logprobs": lp, "finish_reason": None, "token_ids": new})
                elif kind == "done":
                    out: RequestOutput = rest[0]
                    finished.add(req_id)
                    await front.finish_routing(out.outputs)
                    for c in out.outputs:
                        ci = j * n + c.index
                        tokens[ci] = list(c.token_ids)
                        usage["completion_tokens"] += len(c.token_ids)
                        yield chunk(ci, text_delta(ci, True), {
                            "logprobs": None, "finish_reason": c.finish_reason, "token_ids": [],
                            "prompt_token_ids": out.prompt_token_ids, **self._routing_fields(c)})
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield _sse({**self._head(rid, chat, True), "choices": [], "usage": usage})
            yield _sse("[DONE]")
        finally:  # a client that went away frees its sequences
            for job in jobs:
                if job.request_id not in finished:
                    front.thread.abort(job.request_id)
