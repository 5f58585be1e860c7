"""The engine loop: admit requests, step the scheduler and the model, finish sequences, and hand
their routing to the caller and the store."""

from __future__ import annotations

import itertools
import logging
import os
import random
import uuid
from collections.abc import Collection
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from routereplay.config import EngineConfig
from routereplay.engine import weight_group
from routereplay.engine.model_runner import MEMORY_TAGS, ModelRunner
from routereplay.engine.scheduler import Scheduler
from routereplay.engine.sequence import Sequence, Status
from routereplay.engine.workers import Workers
from routereplay.layers.parallel import TP
from routereplay.models.loader import checkpoint_tensors
from routereplay.outputs import CompletionOutput, RequestOutput
from routereplay.sampling_params import SamplingParams, client_key_error, routing_key

log = logging.getLogger("routereplay.engine")


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    want_routing: bool  # routed_experts in the output
    stores_routing: bool  # written to the routing store
    key_root: str  # its samples' store keys derive from it (routing_key)
    prompt_index: int | None  # its place in a batch that shares one rollout id
    stream: bool = False  # step() returns per-step deltas of its samples
    sent: list[int] = field(default_factory=list)  # per sample: tokens already returned as deltas
    done: dict[int, CompletionOutput] = field(default_factory=dict)
    pending: list = field(default_factory=list)  # (output, Future of the arrays, index) awaiting the host copy


def load_tokenizer(model_dir: str):
    """transformers' tokenizer for the checkpoint, or None (logged) if it has no tokenizer files."""
    from transformers import AutoTokenizer

    # Without its files transformers would build an empty tokenizer from config.json alone.
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        log.warning("no tokenizer in %s: token-id prompts only", model_dir)
        return None
    return AutoTokenizer.from_pretrained(model_dir)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        TP.rank, TP.size = 0, 1
        workers = Workers(config) if config.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(config, rank=0)
        except BaseException:
            if workers is not None:
                workers.close(graceful=False)
            raise
        self.runner.workers = workers
        self.scheduler = Scheduler(config, self.runner.num_blocks)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._run_id = uuid.uuid4().hex[:12]  # default request ids (store keys) differ between engines
        self._roots_in_flight: dict[tuple[str, int | None], str] = {}  # (rollout id, prompt index) -> request
        # Per step only the requests that can have news are visited, not every one in flight (1,024 in RL):
        self._streams: dict[str, _Request] = {}  # requests with stream=True
        self._completing: dict[str, _Request] = {}  # requests with a finished sample since they were last visited
        self._gathers: list[tuple[_Request, CompletionOutput, int, int]] = []  # (.., table row, rows) to copy
        self._rng = random.Random(config.seed)
        self.store_writer = None
        rr = config.routing_replay
        if rr.enable and rr.store != "none":
            from routereplay.store import StoreWriter
            from routereplay.store import open as open_store

            self.store_writer = StoreWriter(open_store(rr.store_url), max_queue=rr.store_queue_size)
        self._counters = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self._tokenizer = None
        self._tokenizer_missing = False

    @property
    def tokenizer(self):
        """The model directory's tokenizer (loaded on first use), or None if it has none."""
        if self._tokenizer is None and not self._tokenizer_missing:
            self._tokenizer = load_tokenizer(self.config.model)
            self._tokenizer_missing = self._tokenizer is None
        return self._tokenizer

    # ---- requests -------------------------------------------------------------------------------
    def validate(self, prompt_token_ids, params: SamplingParams) -> None:
        """Raise ValueError naming the field; nothing is queued."""
        mc, cfg = self.model_config, self.config
        if self.runner.released:  # the caches or weights hold no memory: a forward would read freed storage
            raise ValueError(f"memory is released ({', '.join(t for t in MEMORY_TAGS if t in self.runner.released)})"
                             ": resume_memory first")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params.validate(mc.vocab_size)
        if params.n > cfg.max_num_seqs:  # its samples could never run in one batch
            raise ValueError(f"n must be <= max_num_seqs ({cfg.max_num_seqs}), got {params.n}")
        if params.min_tokens > 0:
            masked = set(params.stop_token_ids) | (set() if params.ignore_eos else set(mc.eos_token_ids))
            if len(masked & set(range(mc.vocab_size))) == mc.vocab_size:
                raise ValueError(f"min_tokens={params.min_tokens} masks every token of the vocabulary (stop_token_ids"
                                 f"{'' if params.ignore_eos else ' and EOS'} cover all {mc.vocab_size}): "
                                 "nothing could be sampled")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer and {cfg.model} has none: use stop_token_ids")
        if not isinstance(prompt_token_ids, (list, tuple)) or len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty")
        for i, t in enumerate(prompt_token_ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < mc.vocab_size:
                raise ValueError(f"prompt_token_ids[{i}] = {t!r} is not a token id in [0, {mc.vocab_size})")
        n = len(prompt_token_ids)
        if n >= cfg.max_model_len:
            raise ValueError(f"prompt has {n} tokens, max_model_len is {cfg.max_model_len} (need room for 1 more)")
        if n + params.max_tokens > cfg.max_model_len:  # vLLM's 400, not a silently shorter completion
            raise ValueError(f"max_tokens: this model's maximum context length is {cfg.max_model_len} tokens; the "
                             f"prompt has {n} tokens and max_tokens is {params.max_tokens}")
        need = -(-(n + params.max_tokens) // cfg.block_size)
        if need > self.runner.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {need} KV blocks, the pool has {self.runner.num_blocks}")
        want = self._wants_routing(params)
        if want and not cfg.routing_replay.enable:
            raise ValueError("return_routed_experts is set but routing capture is disabled "
                             "(routing_replay.enable=false)")
        if params.routed_experts_start > n:
            raise ValueError(f"routed_experts_start={params.routed_experts_start} is beyond the prompt ({n} tokens)")

    def _wants_routing(self, params: SamplingParams) -> bool:
        rr = self.config.routing_replay
        if params.return_routed_experts is None:
            return rr.enable and rr.return_routed_experts
        return params.return_routed_experts

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, prompt_index: int | None = None, stream: bool = False) -> str:
        """Queue one prompt (``params.n`` samples). ``prompt_index``: its place in a batch of prompts that
        share ``params.rollout_id`` (store keys ``rollout_id/j/i``, ``routing_key``). ``stream``: ``step()``
        also returns what each step added (``RequestOutput.finished`` False), before the final output."""
        self.validate(prompt_token_ids, params)
        request_id = request_id or f"req-{self._run_id}-{next(self._request_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        stores = self.store_writer is not None and params.store_routing
        root = (params.rollout_id or request_id, prompt_index)
        if stores:
            if params.rollout_id is None and (why := client_key_error(request_id)) is not None:
                raise ValueError(f"request_id {why} (it is the store key without a rollout_id)")
            # The same rollout twice at once would write the same keys: a later turn starts after the earlier ended.
            if root in self._roots_in_flight:
                raise ValueError(f"rollout_id {root[0]!r}{'' if prompt_index is None else f' (prompt {prompt_index})'}"
                                 f" is in flight already (request {self._roots_in_flight[root]!r})")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seqs = []
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, i, list(prompt_token_ids), len(prompt_token_ids),
                           params, seed=(base_seed + i * 0x9E3779B1) & ((1 << 62) - 1))
            seq.waits_for = seqs[0] if i and self.config.enable_prefix_caching else None
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, prompt, list(prompt_token_ids), params, seqs,
                                             self._wants_routing(params), stores, root[0], prompt_index, stream,
                                             [0] * params.n)
        if stores:
            self._roots_in_flight[root] = request_id
        if stream:
            self._streams[request_id] = self.requests[request_id]
        self._counters["requests"] += 1
        self._counters["prompt_tokens"] += len(prompt_token_ids)
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled batch; returns the requests that completed."""
        batch = self.scheduler.schedule()
        failed: list[RequestOutput] = []
        if batch:
            sampled, tokens, logprobs, tops, errors = self.runner.run(batch)
            for seq, n in batch:
                seq.num_computed_tokens += n
                self.scheduler.blocks.commit(seq)
            broken: dict[str, str] = {}  # request id -> its first broken sample's error
            if any(err is not None for err in errors):
                for seq, err in zip(sampled, errors, strict=True):
                    if err is not None:
                        broken.setdefault(seq.request_id, f"sample {seq.sample_index}: the model produced a "
                                                          f"non-finite distribution at position {len(seq)} ({err})")
            failed = [self._fail(self.requests[rid], error) for rid, error in broken.items()]
            eos, max_len = self.model_config.eos_token_ids, self.config.max_model_len
            with_stop_strings, appended = [], 0
            # one pass per sampled sequence (1,024 in RL): this loop is the host's per-step cost
            for seq, token, lp, top in zip(sampled, tokens, logprobs, tops, strict=True):
                if broken and seq.request_id in broken:  # ended by _fail: no token of this step
                    continue
                seq.token_ids.append(token)
                seq.logprobs.append(lp)
                appended += 1
                if top is not None:
                    seq.top_logprobs.append(top)
                p = seq.params
                generated = len(seq.token_ids) - seq.num_prompt_tokens
                # min_tokens: too short to stop (its stop tokens were masked), as in vLLM
                if generated >= p.min_tokens and ((not p.ignore_eos and token in eos) or token in p.stop_token_ids):
                    self._finish(seq, "stop")
                elif p.stop and generated >= p.min_tokens:
                    with_stop_strings.append(seq)  # a stop string wins over the length limit of the same token
                # validate keeps prompt + max_tokens within max_model_len: the second test is a safety net
                elif generated >= p.max_tokens or len(seq.token_ids) >= max_len:
                    self._finish(seq, "length")
            self._counters["generation_tokens"] += appended
            hits = self._stop_strings(with_stop_strings) if with_stop_strings else {}
            for seq in with_stop_strings:
                seq.stop_reason = hits.get(seq)
                if seq.stop_reason is not None:
                    self._finish(seq, "stop")
                elif seq.num_generated >= seq.params.max_tokens or len(seq) >= max_len:
                    self._finish(seq, "length")
            self._gather_routing()
        return failed + self._deltas() + self._collect(block=not batch)

    def _deltas(self) -> list[RequestOutput]:
        """What the last step added to each streaming request's samples (the tokens only grow: a preempted
        sample is recomputed from its tokens, so the deltas add up to exactly the final output)."""
        outs = []
        for req in self._streams.values():
            parts = []
            for seq in req.seqs:
                a, b = req.sent[seq.sample_index], seq.num_generated
                if b > a:
                    tops = seq.top_logprobs[a:b] if seq.params.top_logprobs else None
                    parts.append(CompletionOutput(seq.sample_index, seq.output_token_ids[a:b], seq.logprobs[a:b],
                                                  None, top_logprobs=tops))
                    req.sent[seq.sample_index] = b
            if parts:
                outs.append(RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, parts,
                                          list(self.model_config.moe_layer_ids), finished=False))
        return outs

    def _fail(self, req: _Request, error: str) -> RequestOutput:
        """End ``req`` now: each unfinished sample with finish_reason "error", what it generated before, and no
        routing (rows of a broken forward); samples that finished earlier keep theirs. The request's output
        carries ``error``."""
        log.error("request %r failed: %s", req.request_id, error)
        for seq in req.seqs:
            if seq.status is Status.FINISHED:
                continue
            p = seq.params
            req.done[seq.sample_index] = CompletionOutput(
                seq.sample_index, seq.output_token_ids, list(seq.logprobs) if p.logprobs else None, "error",
                top_logprobs=list(seq.top_logprobs) if p.top_logprobs else None,
                routed_experts_start=p.routed_experts_start)
            self.scheduler.finish(seq)
        out = self._complete(req, block=True)
        out.error = error
        return out

    def _stop_strings(self, seqs: list[Sequence]) -> dict[Sequence, str]:
        """The stop string that ends in each sequence's newest token's text, where one does. Decoding only a
        tail of the output keeps this O(1) per token; the tail spans more tokens than the longest stop string
        has characters (a token decodes to at least one character, byte-fallback pieces to a replacement
        mark). One batched decode per step: per-sequence calls cost ~3x more host time."""
        hits: dict[Sequence, str] = {}
        for skip in (True, False):
            group = [s for s in seqs if s.params.skip_special_tokens is skip]
            if not group:
                continue
            tails = [s.output_token_ids[-(max(map(len, s.params.stop)) + 8) :] for s in group]
            for seq, text in zip(group, self._decode_batch(tails, skip), strict=True):
                hit = next((x for x in seq.params.stop if x in text), None)
                if hit is not None:
                    hits[seq] = hit
        return hits

    def _decode_batch(self, token_ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        """``tokenizer.decode`` of each list: straight through the Rust backend when that gives the same text
        (no clean-up of tokenization spaces), else through transformers."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None and not getattr(tok, "clean_up_tokenization_spaces", True):
            return backend.decode_batch(token_ids, skip_special_tokens=skip_special_tokens)
        return tok.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _finish(self, seq: Sequence, reason: str) -> None:
        req = self.requests[seq.request_id]
        out = CompletionOutput(seq.sample_index, seq.output_token_ids, list(seq.logprobs) if seq.params.logprobs
                               else None, reason, stop_reason=seq.stop_reason,
                               top_logprobs=list(seq.top_logprobs) if seq.params.top_logprobs else None,
                               routed_experts_start=seq.params.routed_experts_start)
        if req.want_routing or req.stores_routing:
            if seq.num_computed_tokens >= len(seq) - 1:
                # its device block-table row: finish() below releases the row and the blocks, but no later
                # step runs before _gather_routing, so nothing overwrites them first
                self._gathers.append((req, out, seq.table_row, len(seq) - 1))
            else:  # only an abort ends a sample before every token but the last was forwarded
                out.routing_error = (f"aborted with {seq.num_computed_tokens} of {len(seq) - 1} routing rows computed "
                                     "(prefill unfinished or preempted): no routing")
        req.done[seq.sample_index] = out
        self._completing[req.request_id] = req
        self.scheduler.finish(seq)

    def _gather_routing(self) -> None:
        """One device gather and one host copy for the routing of every sample finished since the last call;
        each sample's rows are delivered once that copy has landed."""
        if not self._gathers:
            return
        arrays = self.runner.gather_routing([(row, n) for _, _, row, n in self._gathers])
        for i, (req, out, _, _) in enumerate(self._gathers):
            req.pending.append((out, arrays, i))
        self._gathers = []

    def _collect(self, block: bool) -> list[RequestOutput]:
        outs = []
        for req in list(self._completing.values()):
            out = self._complete(req, block)
            if out is not None:
                outs.append(out)
            elif not req.pending:  # nothing to deliver until another of its samples finishes
                del self._completing[req.request_id]
        return outs

    def _complete(self, req: _Request, block: bool) -> RequestOutput | None:
        """Deliver the routing copies that have landed (all with ``block``); the output once every sample is done."""
        still = []
        for out, arrays, i in req.pending:
            if not (block or arrays.done()):
                still.append((out, arrays, i))
                continue
            self._deliver_routing(req, out, arrays.result()[i])
        req.pending = still
        if len(req.done) < req.params.n or req.pending:
            return None
        self._drop(req)
        # Sample 0 computed them for all; incomplete (an abort or error before the prompt was forwarded): None
        head = req.seqs[0]
        prompt_lps = head.prompt_logprobs if req.params.prompt_logprobs is not None else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             [req.done[i] for i in range(req.params.n)], list(self.model_config.moe_layer_ids),
                             num_cached_tokens=head.num_cached_prompt_tokens,
                             prompt_logprobs=None if head.needs_prompt_logprobs else prompt_lps)

    def _deliver_routing(self, req: _Request, out: CompletionOutput, array: np.ndarray) -> None:
        if not self.config.routing_replay.debug and self.model_config.routing_dtype == np.uint16:
            array = array.view(np.uint16)  # stored as int16 on the device: same bits
        if req.stores_routing:
            out.routing_key = routing_key(req.key_root, req.params.n, out.index, req.prompt_index)
            try:
                out.store_future = self.store_writer.submit(out.routing_key, array)
            except Exception as e:  # never let one request's store failure stall the loop
                log.error("routing store write for %r failed: %s", out.routing_key, e)
                out.store_future = Future()
                out.store_future.set_exception(e)
        if req.want_routing:
            out.routed_experts = array[out.routed_experts_start :]

    def abort(self, request_id: str, keep_output: bool = False) -> RequestOutput | None:
        """Stop a request between two steps; unknown or finished ids are ignored.

        ``keep_output`` (SGLang's /abort_request): its unfinished samples end now with finish_reason
        "abort" and what they generated so far (token ids, log-probs, and routing when every row is
        computed: always for a decoding sample, never for one still in prefill or preempted), and the
        request's output is returned and stored like a finished one. Otherwise it is dropped.
        """
        req = self.requests.get(request_id)
        if req is None:
            return None
        unfinished = [seq for seq in req.seqs if seq.status is not Status.FINISHED]
        if not keep_output:
            self._drop(req)
            for seq in unfinished:
                self.scheduler.finish(seq)
            return None
        for seq in unfinished:
            self._finish(seq, "abort")
        self._gather_routing()
        return self._complete(req, block=True)

    def _drop(self, req: _Request) -> None:
        del self.requests[req.request_id]
        self._streams.pop(req.request_id, None)
        self._completing.pop(req.request_id, None)
        self._gathers = [g for g in self._gathers if g[0] is not req]
        self._roots_in_flight.pop((req.key_root, req.prompt_index), None)

    def retract(self) -> None:
        """Free the KV cache of every running request: each is recomputed from its tokens when it is
        scheduled again, so after a weight sync its cache and routing rows come from the new weights."""
        self.scheduler.preempt_all()

    @property
    def stores_routing(self) -> bool:
        """Whether routing is written to a store (then every output has a routing_key)."""
        return self.store_writer is not None

    def stats(self) -> dict[str, int]:
        """Counters and gauges for monitoring: requests / prompt / generation tokens so far, sequences waiting
        and running, free KV blocks (cached prefixes count as free), preemptions, and the store writer's
        queue depth, writes done and failed (refused submits included). It only reads sizes and counters,
        so a monitor may call it from another thread while the engine steps."""
        s, w = self.scheduler, self.store_writer
        return {**self._counters, "waiting": len(s.waiting), "running": len(s.running),
                "free_kv_blocks": s.blocks.num_free, "total_kv_blocks": self.runner.num_blocks,
                "preemptions": s.num_preemptions, "store_queue_depth": w.queue_depth if w else 0,
                "store_written": w.written if w else 0, "store_errors": w.errors if w else 0}

    def update_weights_from_checkpoint(self, model_dir: str) -> int:
        """``update_weights`` from a checkpoint directory (safetensors, transformers or checkpoint names);
        every name and shape is checked before anything is written."""
        return self.update_weights(checkpoint_tensors(model_dir))

    # ---- weight sync from a trainer's process group (SGLang's layout; engine/weight_group.py) -------------
    def join_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str = "weight_update_group", backend: str = "nccl",
                          timeout_s: float = weight_group.DEFAULT_TIMEOUT_S) -> weight_group.WeightGroup:
        """Every tensor-parallel rank joins the trainer's group as ``rank_offset + tp_rank``; blocks until it
        has formed (at most ``timeout_s``). ValueError before any rendezvous when ``world_size`` has no room,
        WeightGroupError when it did not form. Under tensor parallelism, call it between two steps."""
        return weight_group.join_weight_group(self, master_address, master_port, rank_offset, world_size,
                                              group_name, backend, timeout_s)

    def check_weight_group(self, rank_offset: int, world_size: int, backend: str = "nccl",
                           timeout_s: float = weight_group.DEFAULT_TIMEOUT_S) -> None:
        """ValueError unless every tensor-parallel rank fits in ``[rank_offset, world_size)``."""
        weight_group.check_weight_group(self, rank_offset, world_size, backend, timeout_s)

    def receive_weights(self, group: weight_group.WeightGroup, names: list[str], dtypes: list[torch.dtype],
                        shapes: list[list[int]]) -> int:
        """Receive the trainer's broadcasts (``names`` order) into the weights; a wrong name or shape: every
        broadcast still received and discarded, then ValueError, nothing written."""
        return weight_group.receive_weights(self, group, names, dtypes, shapes)

    def leave_weight_group(self, group: weight_group.WeightGroup) -> None:
        weight_group.leave_weight_group(self, group)

    def update_weights(self, named_tensors) -> int:
        """In-place weight sync; cached prefixes were computed with the old weights, so drop them."""
        written = self.runner.update_weights(named_tensors)
        self.reset_prefix_cache()
        return written

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (running sequences keep their blocks)."""
        self.scheduler.blocks.cached.clear()
        for block in self.scheduler.blocks.blocks:
            block.hash, block.token_ids = None, ()

    # ---- releasing GPU memory for a colocated trainer (SGLang's /release_memory_occupation) ----------
    @property
    def released(self) -> frozenset[str]:
        """The memory tags (``MEMORY_TAGS``) released by ``release_memory`` and not resumed yet; while any is,
        ``validate`` / ``add_request`` refuse requests."""
        return self.runner.released

    def _memory_tags(self, tags: Collection[str] | None, what: str) -> frozenset[str]:
        if tags is None or (not isinstance(tags, str) and len(tags) == 0):  # SGLang: none or [] is all
            tags = MEMORY_TAGS
        elif isinstance(tags, str):
            raise ValueError(f"{what}: tags must be a list of tags, got the string {tags!r}")
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise ValueError(f"{what}: unknown tags {bad}; known: {', '.join(MEMORY_TAGS)}")
        if self.config.tensor_parallel_size > 1:
            raise NotImplementedError(f"{what} with tensor_parallel_size > 1 is not supported yet "
                                      f"(tensor_parallel_size={self.config.tensor_parallel_size})")
        return frozenset(tags)

    def release_memory(self, tags: Collection[str] | None = None) -> None:
        """Give the device memory of ``tags`` back (SGLang's ``/release_memory_occupation``), for a trainer on
        the same GPU: "kv_cache" the KV and routing caches (their contents and the prefix cache are
        dropped), "weights" the parameters and buffers (kept in host memory, pinned on CUDA, so
        ``resume_memory`` alone restores them), "cuda_graph" the decode graphs' pool. The decode graphs go
        with any tag (they hold the caches' and weights' addresses). ``None`` or ``[]``: every tag.
        Idempotent: a tag released already is skipped. No request may be in flight (ValueError): pause and
        abort them first. Until every tag is resumed, requests are refused (ValueError)."""
        tags = self._memory_tags(tags, "release_memory")
        if self.requests:
            raise ValueError(f"release_memory: {len(self.requests)} requests are in flight: pause and abort them "
                             "first")
        if "kv_cache" in tags:
            self.reset_prefix_cache()  # the cached blocks' contents are gone
        self.runner.release_memory(tags)
        log.info("released memory: %s", ", ".join(t for t in MEMORY_TAGS if t in self.released) or "none")

    def resume_memory(self, tags: Collection[str] | None = None) -> None:
        """Take back the memory ``release_memory`` gave (SGLang's ``/resume_memory_occupation``): the weights
        as they were released (into the same Parameter objects, so weight-sync names stay valid), the caches
        empty, with the same shapes. ``None`` or ``[]``: every tag. A tag not released is skipped. The decode
        graphs are captured again once nothing is released. Weights may be updated once "weights" is
        resumed, the caches still released (a trainer's order: weights, update_weights, then kv_cache)."""
        tags = self._memory_tags(tags, "resume_memory")
        self.runner.resume_memory(tags)
        log.info("resumed memory; still released: %s",
                 ", ".join(t for t in MEMORY_TAGS if t in self.released) or "none")

    def close(self, timeout: float | None = None) -> None:
        """Flush the routing store writer (waiting at most ``timeout`` seconds) and stop the TP workers."""
        if self.store_writer is not None:
            self.store_writer.close(timeout)
            if self.store_writer.queue_depth:
                log.error("closed with %d routing writes unfinished", self.store_writer.queue_depth)
        if self.runner.workers is not None:
            self.runner.release_graphs()
            self.runner.workers.close()
            self.runner.workers = None
        self.runner.close()
