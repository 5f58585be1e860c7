"""The server's wire protocol: request bodies (OpenAI's and SGLang's names) and errors that name the field."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, ClassVar, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from routereplay.sampling_params import WIRE_NAMES
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
class _OpenAIBase(BaseModel):
    # Strict: a JSON API should not turn "5" into 5 or true into 1. Unknown fields are ignored, as vLLM does.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # OpenAI's end-user id: logged by nobody here, never a store key
    # OpenAI fields this engine does not implement: rejected when set to a value other than "off" (UNSUPPORTED:
    # field -> the numeric value that means off)
    UNSUPPORTED: ClassVar[dict[str, float]] = {"suffix": 0, "best_of": 1, "logit_bias": 0, "tools": 0}
    suffix: Any = None
    best_of: Any = None
    logit_bias: Any = None
    tools: Any = None


# The sampling fields, named as WIRE_NAMES says; unset (None) keeps SamplingParams' default, and their values
# are checked by SamplingParams.validate (the one place that knows each field's type and bounds).
SamplingBody = create_model("SamplingBody", __base__=_OpenAIBase,
                            **{w.openai: (Any, None) for w in WIRE_NAMES if w.openai})
SamplingBody.__doc__ = "The fields OpenAI's completions and chat completions share."


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: bool | int | None = None
    echo: bool = False  # with logprobs: the prompt's tokens and log-probs come first (lm-eval's log-likelihoods)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage]
    echo: Any = None  # completions only
    UNSUPPORTED: ClassVar[dict[str, float]] = {**_OpenAIBase.UNSUPPORTED, "echo": 0}
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


# A field of SGLang's request that this server accepts without implementing it: ``ANY`` value (it does not
# change what one server computes: routing hints for a router, logging), or only the listed default values
# (anything else is a 400 naming it).
ANY = ("<any value>",)


class SGLangBody(BaseModel):
    """A body of SGLang's API as its clients (and sglang-router, which re-serialises them with every field it
    knows at its default) send it: the fields this server implements, plus ``INERT``; any other is a 400."""

    model_config = ConfigDict(strict=True, extra="allow")
    INERT: ClassVar[dict[str, tuple]] = {}

    def check_inert(self, where: str = "") -> None:
        for name, value in (self.model_extra or {}).items():
            accepted = self.INERT.get(name)
            if accepted is None:
                raise ApiError(400, f"{where}{name} is not a field of this endpoint", where + name)
            if accepted is not ANY and value not in accepted:
                raise ApiError(400, f"{where}{name}={value!r} is not supported by this server (only "
                               f"{' or '.join(map(repr, accepted))})", where + name)


class GenerateBody(SGLangBody):
    """SGLang's native ``/generate`` (python/sglang/srt/managers/io_struct.py GenerateReqInput): one prompt or
    a batch (lists of ``text`` / ``input_ids``, ``rid`` then a list too), no stream."""

    INERT: ClassVar[dict[str, tuple]] = {
        **dict.fromkeys(["model", "log_metrics", "no_logs", "custom_labels", "priority", "routing_key",
                         "conversation_id", "data_parallel_rank", "routed_dp_rank", "disagg_prefill_dp_rank",
                         "kv_router_hint", "extra_key", "external_trace_header", "received_time", "http_worker_ipc",
                         "return_text_in_logprobs", "cache_salt"], ANY),
        **dict.fromkeys(["background", "return_hidden_states", "return_bytes", "return_entropy",
                         "return_prompt_token_ids", "require_reasoning", "return_indexer_topk",
                         "return_flat_raw_top_logprobs", "return_flat_raw_top_logprobs_b64", "use_audio_in_video"],
                        (False, None)),
        "logprob_start_len": (None, -1),
        **dict.fromkeys(["session_id", "input_embeds", "image_data", "video_data", "audio_data", "mm_hashes",
                         "mm_content_hashes", "video_config", "modalities", "session_params", "lora_path", "lora_id",
                         "custom_logit_processor", "positional_embed_overrides", "bootstrap_host", "bootstrap_port",
                         "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "max_thinking_tokens",
                         "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls", "max_dynamic_patch",
                         "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
                         "multi_item_delimiter_indices", "token_ids_logprob", "return_sampling_mask"], (None,)),
    }

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    return_logprob: bool | None = False
    top_logprobs_num: int | None = 0  # with return_logprob: the N most likely tokens at each generated position
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    # routereplay: routed_experts in our compact form (MoE layers only, .npy base64) instead of SGLang's
    routed_experts_compact: bool = False
    rid: str | list[str] | None = None  # also the routing store key
    stream: bool = False


# sampling_params keys SGLang knows and this server does not implement (python/sglang/srt/sampling/
# sampling_params.py; slime sends spaces_between_special_tokens, and custom_params when top_p != 1)
SGLANG_SAMPLING_INERT: dict[str, tuple] = {
    # transformers 5 tokenizers put no spaces between special tokens anyway; custom_params feed custom logit
    # processors, which this server has none of; stream_interval paces streams, which /generate does not send
    **dict.fromkeys(["spaces_between_special_tokens", "custom_params", "stream_interval"], ANY),
    "min_p": (0, 0.0, None),
    **dict.fromkeys(["json_schema", "regex", "ebnf", "structural_tag", "logit_bias", "thinking_budget"], (None,)),
}


_SGLANG_REQ = {"rid": ANY, "http_worker_ipc": ANY}  # every SGLang control request carries these


class AbortBody(SGLangBody):
    """SGLang's ``/abort_request``: one rollout (``rid``: /generate's rid, an OpenAI rollout_id, a batch's
    rollout_id) or all."""

    INERT: ClassVar[dict[str, tuple]] = {"http_worker_ipc": ANY}
    rid: str = ""
    abort_all: bool = False


class PauseBody(SGLangBody):
    """SGLang's ``/pause_generation`` modes: ``abort`` ends the requests in flight with what they generated
    (as /abort_request), ``retract`` frees their KV cache (recomputed on continue, e.g. with synced weights),
    ``in_place`` keeps them as they are."""

    INERT: ClassVar[dict[str, tuple]] = _SGLANG_REQ
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueBody(SGLangBody):
    INERT: ClassVar[dict[str, tuple]] = {**_SGLANG_REQ, "torch_empty_cache": ANY}


class WeightGroupBody(SGLangBody):
    """SGLang's ``/init_weights_update_group``: this server's ranks join as ``rank_offset + tp_rank`` (world_size
    counts them all); the trainer is rank 0 and hosts the rendezvous."""

    INERT: ClassVar[dict[str, tuple]] = _SGLANG_REQ
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int
    world_size: int = Field(ge=2, le=1 << 16)
    group_name: str = "weight_update_group"
    backend: Literal["gloo", "nccl"] = "nccl"


# Weight updates: this server always drops the prefix cache after one (it holds the old weights' KV) and
# never pauses by itself, so flush_cache and keep_pause change nothing; load_format only as "auto"/None.
_UPDATE_INERT = {**_SGLANG_REQ, **dict.fromkeys(["flush_cache", "torch_empty_cache", "keep_pause",
                                                 "recapture_cuda_graph", "token_step"], ANY),
                 "load_format": (None, "auto"), "is_async": (False,), "manifest": (None,)}


class DistributedWeightsBody(SGLangBody):
    """SGLang's ``/update_weights_from_distributed``: rank 0 broadcasts each tensor in ``names`` order."""

    INERT: ClassVar[dict[str, tuple]] = _UPDATE_INERT
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    weight_version: str | None = None  # reported back by /get_weight_version and /generate's meta_info
    abort_all_requests: bool = False  # end the requests in flight first (as /abort_request abort_all)


class GroupNameBody(SGLangBody):
    INERT: ClassVar[dict[str, tuple]] = _SGLANG_REQ
    group_name: str = "weight_update_group"


class UpdateWeightsBody(SGLangBody):
    model_config = ConfigDict(strict=True, extra="allow", protected_namespaces=())
    INERT: ClassVar[dict[str, tuple]] = _UPDATE_INERT

    model_path: str  # a checkpoint directory (safetensors, transformers names), e.g. the trainer's save
    weight_version: str | None = None
    abort_all_requests: bool = False


class MemoryBody(SGLangBody):
    """SGLang's ``/release_memory_occupation`` and ``/resume_memory_occupation``."""

    INERT: ClassVar[dict[str, tuple]] = _SGLANG_REQ
    tags: list[Literal["kv_cache", "weights", "cuda_graph"]] | None = None  # None or []: all (SGLang)




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
        body = model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    if isinstance(body, SGLangBody):
        body.check_inert()
    return body
