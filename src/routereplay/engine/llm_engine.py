"""The engine loop: admit requests, step the scheduler and the model, finish sequences, and hand
their routing to the caller and the store."""

from __future__ import annotations

import itertools
import logging
import os
import random
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from routereplay.config import EngineConfig
from routereplay.engine.model_runner import ModelRunner
from routereplay.engine.scheduler import Scheduler
from routereplay.engine.sequence import Sequence, Status
from routereplay.engine.workers import Workers
from routereplay.layers.parallel import TP
from routereplay.outputs import CompletionOutput, RequestOutput
from routereplay.sampling_params import SamplingParams

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
    done: dict[int, CompletionOutput] = field(default_factory=dict)
    pending: list = field(default_factory=list)  # (output, host rows, event) awaiting the device copy


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
        self._rng = random.Random(config.seed)
        self.store_writer = None
        rr = config.routing_replay
        if rr.enable and rr.store != "none":
            from routereplay.store import StoreWriter
            from routereplay.store import open as open_store

            self.store_writer = StoreWriter(open_store(rr.store_url), max_queue=rr.store_queue_size)
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0}
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
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params.validate(mc.vocab_size)
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
        need = -(-min(n + params.max_tokens, cfg.max_model_len) // cfg.block_size)
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
                    prompt: str | None = None) -> str:
        self.validate(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seqs = []
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, i, list(prompt_token_ids), len(prompt_token_ids),
                           params, seed=(base_seed + i * 0x9E3779B1) & ((1 << 62) - 1))
            seq.waits_for = seqs[0] if i and self.config.enable_prefix_caching else None
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, prompt, list(prompt_token_ids), params, seqs,
                                             self._wants_routing(params),
                                             self.store_writer is not None and params.store_routing)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt_token_ids)
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled batch; returns the requests that completed."""
        batch = self.scheduler.schedule()
        if batch:
            sampled, tokens, logprobs, tops = self.runner.run(batch)
            for seq, n in batch:
                seq.num_computed_tokens += n
                self.scheduler.blocks.commit(seq)
            going = []
            for seq, token, lp, top in zip(sampled, tokens, logprobs, tops, strict=True):
                seq.token_ids.append(token)
                seq.logprobs.append(lp)
                if top is not None:
                    seq.top_logprobs.append(top)
                self.stats["generation_tokens"] += 1
                p = seq.params
                # min_tokens: too short to stop (its stop tokens were masked), as in vLLM
                may_stop = seq.num_generated >= p.min_tokens
                if may_stop and ((not p.ignore_eos and token in self.model_config.eos_token_ids)
                                 or token in p.stop_token_ids):
                    self._finish(seq, "stop")
                else:
                    going.append(seq)
            hits = self._stop_strings([s for s in going if s.params.stop and s.num_generated >= s.params.min_tokens])
            for seq in going:
                seq.stop_reason = hits.get(seq)
                if seq.stop_reason is not None:  # a stop string wins over the length limit of the same token
                    self._finish(seq, "stop")
                elif seq.num_generated >= seq.params.max_tokens or len(seq) >= self.config.max_model_len:
                    self._finish(seq, "length")
        return self._collect(block=not batch)

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
                rows, event = self.runner.gather_routing(seq, 0, len(seq) - 1)
                req.pending.append((out, rows, event))
            else:  # only an abort ends a sample before every token but the last was forwarded
                out.routing_error = (f"aborted with {seq.num_computed_tokens} of {len(seq) - 1} routing rows computed "
                                     "(prefill unfinished or preempted): no routing")
        req.done[seq.sample_index] = out
        self.scheduler.finish(seq)

    def _collect(self, block: bool) -> list[RequestOutput]:
        outs = [self._complete(req, block) for req in list(self.requests.values())]
        return [o for o in outs if o is not None]

    def _complete(self, req: _Request, block: bool) -> RequestOutput | None:
        """Deliver the routing copies that have landed (all with ``block``); the output once every sample is done."""
        still = []
        for out, rows, event in req.pending:
            if event is not None and not (block or event.query()):
                still.append((out, rows, event))
                continue
            if event is not None:
                event.synchronize()
            self._deliver_routing(req, out, rows)
        req.pending = still
        if len(req.done) < req.params.n or req.pending:
            return None
        del self.requests[req.request_id]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             [req.done[i] for i in range(req.params.n)], list(self.model_config.moe_layer_ids),
                             num_cached_tokens=req.seqs[0].num_cached_prompt_tokens)

    def _deliver_routing(self, req: _Request, out: CompletionOutput, rows: torch.Tensor) -> None:
        array = rows.numpy()
        if not self.config.routing_replay.debug and self.model_config.routing_dtype == np.uint16:
            array = array.view(np.uint16)  # stored as int16 on the device: same bits
        if req.stores_routing:
            key = req.params.rollout_id or req.request_id
            out.routing_key = key if req.params.n == 1 else f"{key}/{out.index}"
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
            del self.requests[request_id]
            for seq in unfinished:
                self.scheduler.finish(seq)
            return None
        for seq in unfinished:
            self._finish(seq, "abort")
        return self._complete(req, block=True)

    def retract(self) -> None:
        """Free the KV cache of every running request: each is recomputed from its tokens when it is
        scheduled again, so after a weight sync its cache and routing rows come from the new weights."""
        self.scheduler.preempt_all()

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

    def close(self) -> None:
        if self.store_writer is not None:
            self.store_writer.close()
        if self.runner.workers is not None:
            self.runner.release_graphs()
            self.runner.workers.close()
            self.runner.workers = None
