"""SGLang's HTTP API as RL frameworks (slime and the stacks built like it) and sglang-router call it:
/generate, generation control (abort, pause, continue, flush, health), and discovery (server and model
info, weight version, workers, loads)."""

from __future__ import annotations

import asyncio
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import Request

from routereplay.engine.llm_engine import LLMEngine
from routereplay.outputs import RequestOutput
from routereplay.routing import encode, to_sglang
from routereplay.sampling_params import WIRE_NAMES, SamplingParams, cut_at_stop
from routereplay.server.engine_thread import Job
from routereplay.server.frontend import Frontend, check_key, wire_param
from routereplay.server.protocol import (
    ANY,
    SGLANG_SAMPLING_INERT,
    AbortBody,
    ApiError,
    GenerateBody,
    MemoryBody,
    PauseBody,
)

SGLANG_SAMPLING = {w.sglang: w.field for w in WIRE_NAMES if w.sglang}  # sampling_params key -> field
_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's


def _version() -> str:
    try:
        return version("routereplay")
    except PackageNotFoundError:
        return "unknown"


class SGLang:
    def __init__(self, front: Frontend) -> None:
        self.front = front

    # -- /generate
    def _sampling_kwargs(self, sampling_params: dict[str, Any] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_tokens": _DEFAULT_MAX_NEW_TOKENS}
        for key, value in (sampling_params or {}).items():
            if key in SGLANG_SAMPLING:
                # SGLang's clients send unset fields as null (slime: stop=None); max_new_tokens null is
                # SGLang's "up to the context length"
                if value is not None or key == "max_new_tokens":
                    kwargs[SGLANG_SAMPLING[key]] = value
                continue
            accepted = SGLANG_SAMPLING_INERT.get(key)
            if accepted is None:
                raise ApiError(400, f"sampling_params.{key} is not supported; supported: "
                               f"{', '.join([*SGLANG_SAMPLING, *SGLANG_SAMPLING_INERT])}", f"sampling_params.{key}")
            if accepted is not ANY and value not in accepted:
                raise ApiError(400, f"sampling_params.{key}={value!r} is not supported by this server",
                               f"sampling_params.{key}")
        return kwargs

    async def generate(self, body: GenerateBody) -> dict[str, Any] | list[dict[str, Any]]:
        """SGLang's ``/generate``: ``text`` or ``input_ids`` (one prompt or a list), ``sampling_params`` with
        SGLang's names; routing as SGLang returns it (``meta_info.routed_experts``: base64 int32
        ``[T, num_hidden_layers, K]``, dense layers zero, rows from ``routed_experts_start_len``). A list comes
        back for a batch or ``sampling_params.n`` > 1, prompt by prompt, sample by sample. Every prompt is
        validated before any is queued."""
        front = self.front
        front.check_alive()
        if body.stream:
            raise ApiError(400, "stream is not supported on /generate: use /v1/completions", "stream")
        if (body.text is None) == (body.input_ids is None):
            raise ApiError(400, "give exactly one of text and input_ids",
                           "text" if body.text is not None else "input_ids")
        field = "text" if body.text is not None else "input_ids"
        if body.text is not None:
            batch = isinstance(body.text, list)
            texts = body.text if batch else [body.text]
            if not texts:
                raise ApiError(400, "text: an empty batch", "text")
            ids = await front.tokenize(texts, [f"text[{j}]" if batch else "text" for j in range(len(texts))])
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
        kwargs = self._sampling_kwargs(body.sampling_params)
        return_logprob, top_n = bool(body.return_logprob), body.top_logprobs_num or 0
        jobs, events, loop = [], asyncio.Queue(), asyncio.get_running_loop()
        for j, ((ids, text), rid) in enumerate(zip(prompts, rids, strict=True)):
            rid = rid or f"gen-{uuid.uuid4().hex}"
            check_key(rid, f"rid[{j}]" if batch else "rid")
            try:
                if top_n and not return_logprob:
                    raise ValueError("top_logprobs needs return_logprob=true")
                limit = kwargs["max_tokens"]
                if limit is None:
                    limit = max(1, front.engine.config.max_model_len - len(ids))
                params = SamplingParams(**{**kwargs, "max_tokens": limit}, logprobs=return_logprob,
                                        top_logprobs=top_n, rollout_id=rid,
                                        return_routed_experts=body.return_routed_experts,
                                        routed_experts_start=body.routed_experts_start_len)
                front.engine.validate(ids, params)
            except (ValueError, TypeError) as e:  # TypeError: a value of the wrong type for its field
                param = wire_param(str(e), "sglang", field)
                param = {"routed_experts_start": "routed_experts_start_len", "rollout_id": "rid",
                         "top_logprobs": "top_logprobs_num"}.get(param, param)
                raise ApiError(400, f"{field}[{j}]: {e}" if batch else str(e), param) from None
            # the engine's id is unique; a rid may come back once its earlier request ended (a later turn)
            jobs.append(Job(f"gen-{uuid.uuid4().hex}", ids, params, text, False, loop, events))
        front.submit(jobs)
        done = await front.wait_all(jobs, "rid")
        results = [result for job in jobs for result in await self._results(body, job, done[job.request_id])]
        return results if batch or len(results) > 1 else results[0]

    async def _results(self, body: GenerateBody, job: Job, out: RequestOutput) -> list[dict[str, Any]]:
        """SGLang's reply items for one prompt: one per sample."""
        front = self.front
        await front.finish_routing(out.outputs)
        params, ids, rid = job.params, job.prompt_token_ids, job.params.rollout_id
        results = []
        for c in out.outputs:
            text = front.decode(c.token_ids, params)
            if c.stop_reason is not None:
                text = cut_at_stop(text, [c.stop_reason], include=params.include_stop_str_in_output)
            if c.finish_reason == "length":
                finish = {"type": "length", "length": len(c.token_ids)}
            elif c.finish_reason == "abort":
                finish = {"type": "abort", "message": "aborted by /abort_request"}
            else:
                finish = {"type": "stop", "matched": c.stop_reason if c.stop_reason is not None else c.token_ids[-1]}
            meta: dict[str, Any] = {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids),
                                    "completion_tokens": len(c.token_ids), "cached_tokens": out.num_cached_tokens,
                                    "weight_version": front.weight_version}
            if body.return_logprob:
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
                if c.top_logprobs is not None:
                    meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in top.items()] for top in c.top_logprobs]
            if c.routed_experts is not None:
                if body.routed_experts_compact:  # ours: MoE layers only, as /v1/completions returns it
                    meta["routed_experts"] = encode(c.routed_experts)
                else:  # SGLang's: a slot per decoder layer, dense layers zero (what slime reshapes and indexes)
                    meta["routed_experts"] = to_sglang(c.routed_experts, out.moe_layer_ids,
                                                       front.engine.config.model_config.num_layers)
                meta["routed_experts_start_len"] = c.routed_experts_start
            if front.engine.stores_routing:
                meta.update(routing_key=c.routing_key, routing_error=c.routing_error)
            results.append({"text": text, "output_ids": c.token_ids, "meta_info": meta})
        return results

    # -- generation control
    async def health_generate(self) -> dict[str, Any]:
        """SGLang's /health_generate (slime's heartbeat): while requests run, a step that finished within the
        last second proves the engine works (a probe would queue behind them and miss the heartbeat's
        timeout); while paused (a weight sync) the engine thread's liveness stands in; otherwise one token
        is generated, stored nowhere."""
        front = self.front
        front.check_alive()
        if front.thread.paused or front.engine.released:  # a weight sync, or a colocated trainer's step
            return {"status": "ok", "checked": "paused" if front.thread.paused else "memory released"}
        if front.engine.stats()["running"] and time.monotonic() - front.thread.last_step < 1.0:
            return {"status": "ok", "checked": "recent step"}
        params = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=False, return_routed_experts=False,
                                store_routing=False)
        job = Job(f"health-{uuid.uuid4().hex}", [0], params, None, False, asyncio.get_running_loop(), asyncio.Queue())
        front.submit([job])
        out = (await front.wait_all([job]))[job.request_id]
        return {"status": "ok", "checked": f"generated {len(out.outputs[0].token_ids)} token"}

    async def flush_cache(self) -> dict[str, Any]:
        """Drop the prefix cache (SGLang's /flush_cache), e.g. after weights changed outside this server."""
        _, error = await self.front.on_engine_thread(lambda engine: engine.reset_prefix_cache())
        if error is not None:
            raise ApiError(503, error, type="server_error")
        return {"success": True}

    async def set_paused(self, paused: bool, mode: str = "in_place") -> dict[str, Any]:
        """While paused, requests are accepted and queued but no engine step runs. Returns once the step in
        progress, if any, has finished, and the requests in flight were handled by ``mode`` (``PauseBody``).
        With ``in_place`` they continue on whatever weights a sync in between installs."""
        thread = self.front.thread

        def apply(engine: LLMEngine) -> None:
            if mode == "abort":
                thread.end_early("", every=True)
            elif mode == "retract":
                engine.retract()
            thread.paused = paused

        _, error = await self.front.on_engine_thread(apply)
        if error is not None:
            raise ApiError(503, error, type="server_error")
        return {"paused": paused, "status": "ok"}

    async def pause(self, body: PauseBody) -> dict[str, Any]:
        return await self.set_paused(True, body.mode)

    async def resume(self, body: Any) -> dict[str, Any]:
        return await self.set_paused(False)

    async def abort_request(self, body: AbortBody) -> dict[str, Any]:
        """SGLang's /abort_request (RL frameworks call it once a rollout batch has enough samples): the
        matching requests end at once and their callers get what was generated, finish_reason abort."""
        if not (body.abort_all or body.rid):
            raise ApiError(400, "give rid or abort_all=true", "rid")
        thread = self.front.thread
        count, error = await self.front.on_engine_thread(lambda engine: thread.end_early(body.rid, body.abort_all))
        if error is not None:
            raise ApiError(503, error, type="server_error")
        return {"success": True, "aborted": count}

    # -- memory, for a trainer on the same GPU
    async def release_memory_occupation(self, body: MemoryBody) -> None:
        """SGLang's /release_memory_occupation (slime, verl: before a colocated trainer's step): free the GPU
        memory of ``tags`` (none or []: all). 400 while requests are in flight: /pause_generation first."""
        return await self._memory(lambda engine: engine.release_memory(body.tags), "release_memory_occupation")

    async def resume_memory_occupation(self, body: MemoryBody) -> None:
        """SGLang's /resume_memory_occupation: take back what was released (the weights as they were)."""
        return await self._memory(lambda engine: engine.resume_memory(body.tags), "resume_memory_occupation")

    async def _memory(self, fn, what: str) -> None:
        _, error = await self.front.on_engine_thread(fn)
        if error is not None:
            raise ApiError(400, f"{what}: {error}", "tags")
        return None  # SGLang answers JSON null, 200

    # -- discovery
    def server_info(self) -> dict[str, Any]:
        """SGLang's /server_info (and /get_server_info): the fields slime's external-engine mode and
        sglang-router read (slime/backends/sglang_utils/external.py; the router's discover_metadata)."""
        front = self.front
        cfg = front.engine.config
        stats = front.engine.stats()
        return {
            "model_path": cfg.model, "served_model_name": front.model_name, "tokenizer_path": cfg.model,
            "tp_size": cfg.tensor_parallel_size, "tensor_parallel_size": cfg.tensor_parallel_size,
            "dp_size": 1, "pp_size": 1, "ep_size": 1, "moe_dp_size": 1, "num_gpus": cfg.tensor_parallel_size,
            "dtype": str(cfg.torch_dtype).removeprefix("torch."), "context_length": cfg.max_model_len,
            "max_running_requests": cfg.max_num_seqs, "max_prefill_tokens": cfg.max_num_batched_tokens,
            "max_total_tokens": stats["total_kv_blocks"] * cfg.block_size, "page_size": cfg.block_size,
            "enable_return_routed_experts": cfg.routing_replay.enable,
            "enable_memory_saver": front.options.enable_memory_saver, "disaggregation_mode": "null",
            "load_balance_method": "round_robin",
            "encoder_only": False, "weight_version": front.weight_version, "version": _version(),
            "internal_states": [{"num_running_reqs": stats["running"], "num_waiting_reqs": stats["waiting"]}],
        }

    def model_info(self) -> dict[str, Any]:
        """SGLang's /model_info (and /get_model_info)."""
        front = self.front
        cfg = front.engine.config
        hf = cfg.model_config.hf_config
        return {"model_path": cfg.model, "tokenizer_path": cfg.model, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": front.weight_version,
                "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": hf.model_type, "architectures": list(getattr(hf, "architectures", None) or [])}

    def weight_version(self) -> dict[str, Any]:
        return {"weight_version": self.front.weight_version}

    def workers(self, request: Request) -> dict[str, Any]:
        """sglang-router's ``GET /workers`` for a server without a router: itself, the one worker (slime's
        abort path lists the workers, then calls each one's /abort_request)."""
        url = str(request.base_url).rstrip("/")
        return {"workers": [{"id": "0", "url": url, "worker_type": "regular", "is_healthy": self.front.thread.alive}],
                "total": 1}

    def loads(self) -> dict[str, Any]:
        """SGLang's ``GET /v1/loads``: what slime polls until a server is idle after an abort."""
        stats = self.front.engine.stats()
        running, waiting = stats["running"], stats["waiting"] + self.front.thread.pending
        return {"loads": [{"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting,
                           "num_reqs": running + waiting}]}
