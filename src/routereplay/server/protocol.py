"""The server's wire protocol: request bodies (OpenAI's and SGLang's names) and errors that name the field."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from routereplay.server.options import ServerOptions


# ---- errors ---------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


_TYPE_TAGS = {"str", "int", "bool", "float", "list", "dict", "none"}


def _loc_to_param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``.

    Union members appear in the location as type tags (``str``, ``list[int]``): they are dropped so
    that the error names the request field.
    """
    text = ""
    for p in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(p, int):
            text += f"[{p}]"
        elif p in _TYPE_TAGS or "[" in p:
            break
        else:
            text += f".{p}" if text else p
    return text or None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of pydantic's (or FastAPI's) validation errors, as a 400 naming its field."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {err.get('msg')}", "body")
    param = _loc_to_param(tuple(err.get("loc", ())))
    msg = err.get("msg")
    if param == "prompt" or (param or "").startswith("prompt["):
        msg = "must be a string, a list of token ids, a list of strings or a list of token-id lists"
    return ApiError(400, f"{param or 'body'}: {msg}", param or "body")


_ENGINE_FIELD = re.compile(r"^([a-z_]+)")


def engine_param(message: str, prompt_field: str) -> str:
    """The request field an ``LLMEngine.validate`` message is about."""
    if message.startswith("prompt + max_tokens"):
        return "max_tokens"
    m = _ENGINE_FIELD.match(message)
    name = m.group(1) if m else "prompt"
    return prompt_field if name in ("prompt", "prompt_token_ids") else name


# ---- request bodies --------------------------------------------------------------------------------
class SamplingBody(BaseModel):
    """The fields OpenAI's completions and chat completions share."""

    # Strict: a JSON API should not turn "5" into 5 or true into 1. Unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    # OpenAI fields this engine does not implement: rejected when set to a non-default value
    stop: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    logit_bias: Any = None
    tools: Any = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # routereplay fields
    return_routed_experts: bool | None = None
    routed_experts_start: int = 0
    rollout_id: str | None = None
    store_routing: bool = True  # false: this request's routing is returned (if asked) but not stored


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: bool | int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


class GenerateBody(BaseModel):
    """SGLang's native ``/generate``, the subset RL frameworks use (slime's rollouts): one prompt or a batch
    (lists of ``text`` / ``input_ids``, ``rid`` then a list too), no stream."""

    model_config = ConfigDict(strict=True, extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    return_logprob: bool = False
    top_logprobs_num: int = 0  # with return_logprob: the N most likely tokens at each generated position
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    # routereplay: routed_experts in our compact form (MoE layers only, .npy base64) instead of SGLang's
    routed_experts_compact: bool = False
    rid: str | list[str] | None = None  # also the routing store key
    stream: bool = False


# SGLang sampling parameter -> SamplingParams field
SGLANG_SAMPLING = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "n": "n", "stop": "stop", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
                    "no_stop_trim": "include_stop_str_in_output", "skip_special_tokens": "skip_special_tokens",
                    "sampling_seed": "seed", "min_new_tokens": "min_tokens", "presence_penalty": "presence_penalty",
                    "frequency_penalty": "frequency_penalty", "repetition_penalty": "repetition_penalty"}
# Accepted and without effect: transformers 5 tokenizers ignore it when decoding (no spaces are put between
# special tokens). slime sends it with every rollout.
SGLANG_NO_EFFECT = {"spaces_between_special_tokens"}


class AbortBody(BaseModel):
    """SGLang's ``/abort_request``: one rollout (``rid``: /generate's rid or an OpenAI rollout_id) or all."""

    model_config = ConfigDict(strict=True, extra="forbid")

    rid: str = ""
    abort_all: bool = False


class PauseBody(BaseModel):
    """SGLang's ``/pause_generation`` modes: ``abort`` ends the requests in flight with what they generated
    (as /abort_request), ``retract`` frees their KV cache (recomputed on continue, e.g. with synced weights),
    ``in_place`` keeps them as they are."""

    model_config = ConfigDict(strict=True, extra="forbid")

    mode: Literal["abort", "retract", "in_place"] = "abort"


class WeightGroupBody(BaseModel):
    """SGLang's ``/init_weights_update_group``: this server joins as rank ``rank_offset`` (one rank, whatever
    its tensor-parallel size); the trainer is rank 0 and hosts the rendezvous."""

    model_config = ConfigDict(strict=True, extra="forbid")

    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int
    world_size: int = Field(ge=2, le=1 << 16)
    group_name: str = "weight_update_group"
    backend: Literal["gloo", "nccl"] = "nccl"


class DistributedWeightsBody(BaseModel):
    """SGLang's ``/update_weights_from_distributed``: rank 0 broadcasts each tensor in ``names`` order."""

    model_config = ConfigDict(strict=True, extra="forbid")

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True  # the prefix cache is always dropped after a sync (it holds the old weights' KV)


class GroupNameBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    group_name: str = "weight_update_group"


class UpdateWeightsBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=())

    model_path: str  # a checkpoint directory (safetensors, transformers names), e.g. the trainer's save



# field -> the numeric value that means "off"
UNSUPPORTED = {"echo": 0, "suffix": 0, "best_of": 1, "logit_bias": 0, "tools": 0}


# ---- reading a body ----------------------------------------------------------------------------------
async def read_body(request: Request, options: ServerOptions) -> bytes:
    """The raw body, refused (413) past ``max_request_bytes`` and (408) when it does not arrive in time."""
    limit = options.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body: {declared} bytes, the limit is {limit} (--max-request-bytes)", "body")
    chunks: list[bytes] = []

    async def collect() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body: more than {limit} bytes (--max-request-bytes)", "body")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), options.request_body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"body: not received within {options.request_body_timeout_s:g} s", "body") from None
    return b"".join(chunks)


# fields holding one prompt or a batch of them
_BATCH_FIELDS = ("prompt", "text", "input_ids")


def _unencodable(obj: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) that is not valid unicode (a lone surrogate), or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if (bad := _unencodable(k, where)) is not None or (bad := _unencodable(v, where)) is not None:
                return bad
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if (bad := _unencodable(v, f"{path}[{i}]")) is not None:
                return bad
    return None


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way JSON text can carry a lone surrogate


def _skip(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def _expect(text: str, i: int, chars: str) -> str:
    if text[i : i + 1] not in tuple(chars):
        raise json.JSONDecodeError(f"expecting one of {chars!r}", text, i)
    return text[i]


def _load_object(text: str, max_prompts: int) -> Any:
    """``json.loads``, except that in a top-level object a batch of prompts is read prompt by prompt and
    refused as soon as it holds more than ``max_prompts``: a 10 MB batch of 2M prompts costs a millisecond
    to refuse, not a full parse (> 1 s of one core)."""
    i = _skip(text, 0)
    if text[i : i + 1] != "{":
        return json.loads(text)
    obj: dict[str, Any] = {}
    i = _skip(text, i + 1)
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            _expect(text, i, '"')
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            _expect(text, i, ":")
            i = _skip(text, i + 1)
            if key in _BATCH_FIELDS and text[i : i + 1] == "[":
                obj[key], i = _load_batch(text, i, key, max_prompts)
            else:
                obj[key], i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if _expect(text, i, ",}") == "}":
                i += 1
                break
            i = _skip(text, i + 1)
    if _skip(text, i) != len(text):
        raise json.JSONDecodeError("extra data", text, i)
    return obj


def _load_batch(text: str, start: int, name: str, max_prompts: int) -> tuple[Any, int]:
    i = _skip(text, start + 1)
    if text[i : i + 1] == "]":
        return [], i + 1
    first, _ = _DECODER.raw_decode(text, i)
    if not isinstance(first, (list, str)):  # one prompt of token ids
        return _DECODER.raw_decode(text, start)
    items = []
    while True:
        item, i = _DECODER.raw_decode(text, i)
        items.append(item)
        if len(items) > max_prompts:
            raise ApiError(400, f"{name}: more than {max_prompts} prompts in one request "
                           "(--max-prompts-per-request)", name)
        i = _skip(text, i)
        if _expect(text, i, ",]") == "]":
            return items, i + 1
        i = _skip(text, i + 1)


def parse_body(model: type[BaseModel], raw: bytes, options: ServerOptions) -> BaseModel:
    """JSON -> ``model``, each failure a 400 naming its field; batches are counted while they are read
    (``_load_object``). Runs off the event loop."""
    try:
        text = raw.decode("utf-8")
        obj: Any = _load_object(text, options.max_prompts_per_request) if text.strip() else {}
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ApiError(400, f"malformed JSON body: {e}", "body") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(obj).__name__}", "body")
    if _SURROGATE_ESCAPE.search(text) and (bad := _unencodable(obj)) is not None:
        raise ApiError(400, f"{bad}: not valid unicode (a lone surrogate)", bad)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
