"""The rollout server: OpenAI's API (``openai.py``), SGLang's (``sglang.py``, weight sync in ``weights.py``)
over one engine thread (``engine_thread.py``), with what they share in ``frontend.py`` and the request
bodies and errors in ``protocol.py``. This module builds the app: the one route table, API-key and body
limits, disconnect handling, lifecycle.

Threads. Handlers (uvicorn's event loop) parse, tokenize, validate and format; parsing and tokenizing run
in worker threads, so a large body never stalls the other streams. ONE engine thread owns the LLMEngine,
which is not thread-safe: it alone calls add_request / step / abort, and runs the control calls (weight
sync, cache flush, pause) between two steps. Handlers hand work over through a queue; the thread answers
through ``loop.call_soon_threadsafe`` into one asyncio.Queue per HTTP request. Handlers do call
``engine.validate`` and ``engine.stats``: they only read configuration, sizes and counters.

Streaming. A streaming request is added with ``stream=True``: ``LLMEngine.step()`` then also returns what
each step added to its samples (``RequestOutput.finished`` False), which the engine thread pushes to the
handler; the deltas add up to exactly the final output. The server uses only the engine's public methods.

Routing. A response (or a stream's final chunk) is sent only after its routing write to the store
finished, so a client holding a response can read the store at once. A failed write is logged,
counted, and reported in the choice's ``routing_error``; the request itself still succeeds.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from routereplay.config import EngineConfig
from routereplay.engine.llm_engine import LLMEngine
from routereplay.server.engine_thread import EngineThread
from routereplay.server.frontend import Frontend
from routereplay.server.openai import OpenAI
from routereplay.server.options import ServerOptions
from routereplay.server.protocol import (
    AbortBody,
    ApiError,
    ChatBody,
    CompletionBody,
    ContinueBody,
    DistributedWeightsBody,
    GenerateBody,
    GroupNameBody,
    MemoryBody,
    PauseBody,
    UpdateWeightsBody,
    WeightGroupBody,
    parse_body,
    read_body,
    validation_error,
)
from routereplay.server.sglang import SGLang
from routereplay.server.weights import Weights

log = logging.getLogger("routereplay.server")

__all__ = ["ApiError", "EngineThread", "ServerOptions", "create_app", "serve"]


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
            result = handler()
            return await result if inspect.isawaitable(result) else result
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
    front = Frontend(engine, served_model_name, options)
    oai, sgl, weights = OpenAI(front), SGLang(front), Weights(front)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        front.thread.start()
        log.info("serving %r (max_model_len %d, routing %s)", front.model_name, engine.config.max_model_len,
                 engine.config.routing_replay.to_dict())
        try:
            yield
        finally:
            front.thread.stop(timeout=options.shutdown_timeout_s)
            engine.close(timeout=options.shutdown_timeout_s)  # flushes the routing store writer
            if engine.stores_routing:
                stats = engine.stats()
                log.info("engine closed: %d routing writes stored, %d failed", stats["store_written"],
                         stats["store_errors"])
            else:
                log.info("engine closed")

    app = FastAPI(title="routereplay", lifespan=lifespan)
    app.state.frontend = front
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

    def health() -> JSONResponse:
        if front.thread.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "message": front.thread.failed or "not started"}, status_code=503)

    def metrics() -> PlainTextResponse:
        return PlainTextResponse(front.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # Every route: (methods, path, handler, its body model or None, whether a disconnect aborts it).
    # response_model=None: the handlers return dicts or responses as they are.
    for methods, path, handler, body, watch in [
        # OpenAI
        (["POST"], "/v1/completions", oai.completions, CompletionBody, True),
        (["POST"], "/v1/chat/completions", oai.chat, ChatBody, True),
        (["GET"], "/v1/models", oai.models, None, False),
        # SGLang: generation and its control
        (["POST"], "/generate", sgl.generate, GenerateBody, True),
        (["POST"], "/abort_request", sgl.abort_request, AbortBody, False),
        (["POST"], "/pause_generation", sgl.pause, PauseBody, False),  # an empty body: mode abort
        (["POST"], "/continue_generation", sgl.resume, ContinueBody, False),
        (["GET", "POST"], "/flush_cache", sgl.flush_cache, None, False),  # SGLang takes both; some clients GET
        (["GET"], "/health_generate", sgl.health_generate, None, False),
        # SGLang: discovery (new names and the older get_ ones, which slime and the router fall back to)
        (["GET"], "/server_info", sgl.server_info, None, False),
        (["GET"], "/get_server_info", sgl.server_info, None, False),
        (["GET"], "/model_info", sgl.model_info, None, False),
        (["GET"], "/get_model_info", sgl.model_info, None, False),
        (["GET"], "/get_weight_version", sgl.weight_version, None, False),
        (["GET"], "/weight_version", sgl.weight_version, None, False),
        (["GET"], "/v1/loads", sgl.loads, None, False),
        # SGLang: weight sync
        (["POST"], "/update_weights_from_disk", weights.update_weights_from_disk, UpdateWeightsBody, False),
        (["POST"], "/init_weights_update_group", weights.init_weights_update_group, WeightGroupBody, False),
        (["POST"], "/update_weights_from_distributed", weights.update_weights_from_distributed,
         DistributedWeightsBody, False),
        (["POST"], "/destroy_weights_update_group", weights.destroy_weights_update_group, GroupNameBody, False),
        (["POST"], "/release_memory_occupation", sgl.release_memory_occupation, MemoryBody, False),
        (["POST"], "/resume_memory_occupation", sgl.resume_memory_occupation, MemoryBody, False),
        # the service itself
        (["GET"], "/health", health, None, False),
        (["GET"], "/metrics", metrics, None, False),
    ]:
        app.add_api_route(path, _endpoint(handler, body, options, watch), methods=methods, response_model=None)

    @app.get("/workers")  # sglang-router's listing, for a server without a router (slime's abort path)
    async def workers(request: Request) -> dict[str, Any]:
        return sgl.workers(request)

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
