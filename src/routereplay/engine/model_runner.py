"""Owns the model, the KV cache and the routing cache beside it; turns a scheduled batch into
tensors, runs the forward (eagerly or by replaying a captured CUDA graph) and samples."""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from routereplay.config import EngineConfig
from routereplay.context import Context, reset_context, set_context
from routereplay.engine.sequence import Sequence
from routereplay.layers.parallel import TP
from routereplay.layers.sampler import sample, top_logprobs
from routereplay.models.loader import check_update, in_chunks, load_checkpoint, update_weights
from routereplay.models.transformer import MoECausalLM
from routereplay.sampling_params import SAMPLING_EPS

# release_memory / resume_memory tags (SGLang's GPU_MEMORY_TYPE_*): the KV and routing caches, the model's
# parameters and buffers, and the decode graphs' memory pool
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
CPU_CACHE_BYTES = 2 << 30  # default KV pool on CPU when num_kv_blocks is not given
# A tiny model on a large GPU would otherwise get tens of millions of blocks, and the block manager's
# per-block bookkeeping would take minutes to build; 1M blocks are 16M cached tokens at block size 16.
MAX_KV_BLOCKS = 1 << 20
# Prompt log-probs: logits of at most this many elements (256 MiB in fp32) exist at once; each piece is reduced
# to the prompt tokens' log-probs and the top N at once, so a long prompt never holds [P, vocab].
PROMPT_LOGITS_ELEMENTS = 1 << 26
MAX_GRAPH_BATCH = 1024  # decode batches up to this many sequences replay a captured CUDA graph


def _split(rows: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    """Consecutive views of ``rows``, one per length."""
    return list(np.split(rows, np.cumsum(lengths)[:-1]))


@dataclass(slots=True)
class StepInputs:
    """Host-side description of one step: what rank 0 sends to the other tensor-parallel ranks.

    Block tables live on the device, one row per running sequence (``Sequence.table_row``); a step carries
    only the entries added since the last (``table_delta``: rows, then columns, then block ids), so neither
    the host nor the message grows with context length."""

    ids: list[int]
    pos: list[int]
    cu: list[int]
    ctx_lens: list[int]
    rows: list[int]
    table_delta: list[int]
    max_q: int
    is_decode: bool
    sample_rows: list[int]
    # prompt log-probs (SamplingParams.prompt_logprobs): the rows whose logits score the next prompt token, that
    # token, the widest top-N asked for among them, and how many rows' logits exist at once; every rank computes
    # those logits piece by piece alike (a gather under TP)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top: int = 0
    prompt_piece: int = 1


def _why_broken(row: torch.Tensor) -> str:
    """What is wrong with a row of logits (penalised and masked) whose sampled token has a non-finite log-prob."""
    if row.isnan().any():
        return "NaN logits"
    if row.isposinf().any():
        return "infinite logits"
    if row.isneginf().all():
        return "every token masked"
    return "logits / temperature overflow float32"


def _penalize(row: torch.Tensor, seq: Sequence, p) -> None:
    """Presence / frequency penalties over the output tokens, repetition penalty over prompt and output,
    in place on one row of logits (vLLM's order: repetition first)."""
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device)
        x = row[seen]
        row[seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
    if seq.num_generated and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(seq.output_token_ids, device=row.device), minlength=row.numel())
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        mc = config.model_config
        self.rank = rank
        self.device = torch.device(f"cuda:{rank}" if config.device.startswith("cuda") else config.device)
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = MoECausalLM(mc.family, mc.hf_config, mc.moe_layer_ids, mc.quant)
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            self._random_weights()
        else:
            load_checkpoint(self.model, mc.model_dir)
        self.model.eval()
        self.num_blocks = self._plan_num_blocks()
        if TP.size > 1:  # every rank must hold the same pool: take the smallest
            n = torch.tensor([self.num_blocks], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            self.num_blocks = int(n.item())
        self._allocate_caches()
        # the block tables, one row per running sequence and a last, all-zero row for graph padding
        self.pad_row = config.max_num_seqs
        self.block_tables = torch.zeros(config.max_num_seqs + 1, self.max_blocks_per_seq, dtype=torch.int32,
                                        device=self.device)
        self.workers = None  # the other tensor-parallel ranks (engine.workers.Workers), set by the engine
        if self.device.type == "cuda":  # gather_routing's device-to-host copies, off the step loop
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="routing-copy")
            self._copy_stream = torch.cuda.Stream(self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_capture_seconds = 0.0
        graph_safe = all(getattr(layer.self_attn, "graph_safe", True) for layer in self.model.model.layers)
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager and graph_safe
        # release_memory: the MEMORY_TAGS whose memory is given back (replaced, never mutated: other threads
        # may read it), and the weights' host copy
        self.released: frozenset[str] = frozenset()
        self._weight_backup: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        if self.use_graphs:
            self._capture_graphs()

    @torch.no_grad()
    def _random_weights(self) -> None:
        """Small random weights (norms at 1, correction biases at 0): realistic shapes and routing spread."""
        g = torch.Generator(self.device).manual_seed(self.config.seed)
        for name, p in self.model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "correction_bias" in name:
                p.zero_()
            elif name.endswith("_scale_inv"):  # block-FP8: N(0, 1) e4m3 codes times 0.02, the same spread
                p.fill_(0.02)
            elif p.dtype == torch.float8_e4m3fn:  # (no normal_ kernel for e4m3)
                p.copy_(torch.randn(p.shape, generator=g, device=p.device))
            else:
                p.normal_(0.0, 0.02, generator=g)

    # ---- memory ---------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        mc, c = self.config.model_config, self.config
        kv = sum(heads * (k_dim + v_dim) for heads, k_dim, v_dim in self._cache_specs())
        kv *= c.block_size * c.torch_dtype.itemsize
        routing = 0
        if c.routing_replay.enable and self.rank == 0:
            routing = c.block_size * mc.num_moe_layers * mc.top_k * c.cache_dtype.itemsize
        return kv + routing

    def _cache_specs(self) -> list[tuple[int, int, int]]:
        return [layer.self_attn.cache_spec() for layer in self.model.model.layers]

    def _plan_num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = self._bytes_per_block()
        if self.device.type != "cuda":
            wanted = self.max_blocks_per_seq * self.config.max_num_seqs
            return max(1, min(wanted, CPU_CACHE_BYTES // per_block))
        # Measure activation peak with a forward over a full token budget (no cache attached yet).
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # memory cached from an earlier engine in this process is free to take
        torch.cuda.reset_peak_memory_stats()
        n = self.config.max_num_batched_tokens
        chunk = min(512, self.config.max_model_len)
        cu = list(range(0, n, chunk)) + [n]
        with torch.inference_mode():
            set_context(Context(
                positions=(torch.arange(n, device=self.device) % chunk),
                cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=self.device),
                max_seqlen_q=chunk,
            ))
            self.model.compute_logits(self.model(torch.zeros(n, dtype=torch.long, device=self.device)))
            reset_context()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        peak, current = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        budget = total * self.config.gpu_memory_utilization - (total - free) - (peak - current)
        blocks = int(budget // per_block)
        if blocks < 1:
            raise RuntimeError("no GPU memory left for the KV cache: raise gpu_memory_utilization")
        return min(blocks, MAX_KV_BLOCKS)

    def _allocate_caches(self) -> None:
        mc, c = self.config.model_config, self.config
        # One K and one V tensor per layer, [num_blocks, block_size, kv heads, dim]; a layer whose V
        # is read from its K cache (MLA) asks for V dim 0.
        for layer, (heads, k_dim, v_dim) in zip(self.model.model.layers, self._cache_specs(), strict=True):
            attn = layer.self_attn
            attn.k_cache, attn.v_cache = (
                torch.empty(self.num_blocks, c.block_size, heads, dim, dtype=c.torch_dtype, device=self.device)
                for dim in (k_dim, v_dim)
            )
        self.routing_cache = None
        if c.routing_replay.enable and self.rank == 0:  # every rank routes identically; rank 0 records
            # One row per KV slot plus a scratch row at the end for padding slots (-1).
            rows = self.num_blocks * c.block_size + 1
            self.routing_cache = torch.zeros(
                rows, mc.num_moe_layers, mc.top_k, dtype=c.cache_dtype, device=self.device
            )

    # ---- releasing GPU memory for a colocated trainer ----------------------------------------------
    def release_memory(self, tags) -> None:
        """Give back the device memory of ``tags`` (of MEMORY_TAGS; ones released already are skipped). The
        decode graphs go whatever the tags (they captured the caches' and weights' addresses); "kv_cache"
        frees the KV and routing caches (contents dropped), "weights" the parameters and buffers (a host
        copy kept, pinned on CUDA). Nothing may be in flight (the engine checks). Then the allocator's free
        blocks go back to the device."""
        tags = set(tags) - self.released
        if not tags:
            return
        self._drop_graphs()  # a failure below leaves the graphs dropped: the next resume_memory captures them
        self.released |= tags & {"cuda_graph"}
        if "weights" in tags:
            self._release_weights()
            self.released |= {"weights"}
        if "kv_cache" in tags:
            self._free_caches()
            self.released |= {"kv_cache"}
        self._empty_device_cache()

    def resume_memory(self, tags) -> None:
        """Take back the memory of ``tags`` (ones not released are skipped): the weights from their host copy
        into the same storages (the same Parameter objects), the caches reallocated with the same shapes
        (routing rows zeroed, KV contents undefined). Once nothing is released, the decode graphs are
        captured again, at the new addresses. A failed allocation (the device still full) raises and
        leaves that tag released."""
        tags = set(tags) & self.released
        if "weights" in tags:
            self._resume_weights()
            self.released -= {"weights"}
        if "kv_cache" in tags:
            try:
                self._allocate_caches()
            except BaseException:
                self._free_caches()
                self._empty_device_cache()
                raise
            self.released -= {"kv_cache"}
        self.released -= tags
        if not self.released and self.use_graphs and not self.graphs:
            # a capture fails if another thread synchronizes meanwhile: let the routing copies in flight land
            self._copier.submit(lambda: None).result()
            try:
                self._capture_graphs()
            except BaseException:  # no half set of graphs: eager until a later resume_memory captures them
                self._drop_graphs()
                self._empty_device_cache()
                raise

    def _model_storages(self) -> list[torch.UntypedStorage]:
        """Every storage behind the model's parameters and buffers, once each (tied weights share one)."""
        seen: dict[int, torch.UntypedStorage] = {}
        for t in (*self.model.parameters(), *self.model.buffers()):
            storage = t.untyped_storage()
            if storage.nbytes():
                seen.setdefault(storage.data_ptr(), storage)
        return list(seen.values())

    def _release_weights(self) -> None:
        """Copy each weight storage's bytes to the host, then resize the storage to 0 bytes: every
        Parameter (and any view of it) stays the same object, holding no memory until resumed."""
        cuda = self.device.type == "cuda"
        backup = []
        for storage in self._model_storages():
            if not storage.resizable():
                raise RuntimeError("release_memory: a weight storage cannot be resized (not allocated by torch)")
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=cuda)
            host.untyped_storage().copy_(storage, non_blocking=cuda)
            backup.append((storage, host))
        if cuda:
            torch.cuda.synchronize(self.device)  # every copy landed before the device memory goes
        for storage, _ in backup:
            storage.resize_(0)
        self._weight_backup = backup

    def _resume_weights(self) -> None:
        """Each weight storage back at its size, its bytes copied from the host; then the host copy goes."""
        cuda = self.device.type == "cuda"
        done, storage, host = [], None, None
        try:
            for storage, host in self._weight_backup:
                storage.resize_(host.numel())
                done.append(storage)
                storage.copy_(host.untyped_storage(), non_blocking=cuda)
            if cuda:
                torch.cuda.synchronize(self.device)
        except BaseException:
            for storage in done:  # all or nothing: the backup stays, the tag stays released
                storage.resize_(0)
            self._empty_device_cache()
            raise
        self._weight_backup = []
        storage = host = None  # no pinned block left referenced here
        if cuda:  # the pinned host copy goes back to the OS (the trainer may want the host memory too)
            empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
            if empty_host_cache is not None:
                empty_host_cache()
            elif hasattr(torch._C, "_host_emptyCache"):  # older torch
                torch._C._host_emptyCache()

    def _free_caches(self) -> None:
        """Drop the KV and routing caches: their storages shrink to 0 bytes (so no reference anywhere keeps
        the memory) and the layers get the empty placeholder they start with."""
        for layer in self.model.model.layers:
            attn = layer.self_attn
            for t in (attn.k_cache, attn.v_cache):
                t.untyped_storage().resize_(0)
            attn.k_cache = attn.v_cache = torch.tensor([])
        if self.routing_cache is not None:
            self.routing_cache.untyped_storage().resize_(0)
        self.routing_cache = None

    def _drop_graphs(self) -> None:
        """Drop the decode graphs, their memory pool and their static inputs / outputs."""
        self.release_graphs()
        for name in ("g_in", "h_in", "g_out", "in_copied"):
            self.__dict__.pop(name, None)

    def _empty_device_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ---- one step -------------------------------------------------------------------------------
    def _context(self, positions, slots, cu, context_lens, tables, max_q, is_decode) -> Context:
        rr = self.config.routing_replay
        return Context(
            positions=positions, slot_mapping=slots, cu_seqlens_q=cu, max_seqlen_q=max_q,
            context_lens=context_lens, block_tables=tables, is_decode=is_decode,
            routing_cache=self.routing_cache, routing_debug=rr.debug,
        )

    def _slot_mapping(self, tables: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """KV slot of each token: its sequence's (``rows`` indexes ``tables``) block at pos // block_size."""
        bs = self.block_size
        return tables[rows, torch.div(pos, bs, rounding_mode="floor")].long() * bs + pos % bs

    def prepare(self, batch: list[tuple[Sequence, int]]
                ) -> tuple[StepInputs, list[Sequence], list[tuple[Sequence, int]]]:
        """The step's token layout; sequences whose last token is forwarded get sampled. Also, per sequence
        that still needs prompt log-probs, how many of its rows score prompt tokens (in inp.prompt_rows)."""
        inp = StepInputs([], [], [0], [], [], [], 0, False, [])
        to_sample = []
        prompt_seqs = []
        d_rows, d_cols, d_blocks = [], [], []
        # locals: this loop runs once per sequence per step (1,024 in RL), its cost is the host's step time
        ids, pos, cu, ctx_lens, rows, sample_rows = inp.ids, inp.pos, inp.cu, inp.ctx_lens, inp.rows, inp.sample_rows
        total = max_q = 0
        for seq, n in batch:
            table, synced = seq.block_table, seq.num_table_synced
            if len(table) > synced:  # blocks added since the last step (all of them after (re)admission)
                d_rows += [seq.table_row] * (len(table) - synced)
                d_cols += range(synced, len(table))
                d_blocks += table[synced:]
                seq.num_table_synced = len(table)
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and seq.needs_prompt_logprobs:
                # Position q scores prompt token q + 1. Positions already scored (before a preemption and
                # recompute) are skipped; none is missing: such a sequence never reads the prefix cache.
                first, end = len(seq.prompt_logprobs) - 1, min(start + n, seq.num_prompt_tokens - 1)
                if start > first:
                    raise RuntimeError(f"sequence {seq.seq_id}: prompt log-probs need position {first}, "
                                       f"its forward starts at {start}")
                if end > first:
                    inp.prompt_rows += range(total + first - start, total + end - start)
                    inp.prompt_targets += seq.token_ids[first + 1 : end + 1]
                    inp.prompt_top = max(inp.prompt_top, seq.params.prompt_logprobs)
                    prompt_seqs.append((seq, end - first))
            tokens = seq.token_ids
            if n == 1:
                ids.append(tokens[start])
                pos.append(start)
            else:
                ids += tokens[start : start + n]
                pos += range(start, start + n)
            total += n
            if n > max_q:
                max_q = n
            cu.append(total)
            ctx_lens.append(start + n)
            rows.append(seq.table_row)
            if start + n == len(tokens):
                sample_rows.append(total - 1)
                to_sample.append(seq)
        inp.table_delta = d_rows + d_cols + d_blocks
        inp.max_q = max_q
        inp.is_decode = inp.cu[-1] == len(batch)
        inp.prompt_piece = max(1, PROMPT_LOGITS_ELEMENTS // self.config.model_config.vocab_size)
        return inp, to_sample, prompt_seqs

    @torch.inference_mode()
    def execute(self, inp: StepInputs) -> tuple[torch.Tensor | None, tuple | None]:
        """Forward the step on this rank: logits [sampled rows, vocab] (gathered over ranks) or None, and on
        rank 0 the prompt log-probs of inp.prompt_rows (``_prompt_logprobs``) or None."""
        dev = self.device
        if inp.table_delta:
            d = self._to_device(inp.table_delta).view(3, -1)
            self.block_tables[d[0], d[1]] = d[2].to(torch.int32)
        if inp.is_decode and self.graphs and len(inp.ids) <= self.graph_sizes[-1]:
            hidden = self._replay(inp)
        else:
            n, s = len(inp.ids), len(inp.rows)
            packed = self._to_device(inp.ids + inp.pos + inp.cu + inp.ctx_lens + inp.rows)  # one copy
            ids, pos, cu, lens, rows = packed.split([n, n, s + 1, s, s])
            cu, lens = cu.to(torch.int32), lens.to(torch.int32)
            tables = self.block_tables[rows]
            seq_of_token = torch.repeat_interleave(torch.arange(s, device=dev), cu.diff(), output_size=n)
            set_context(self._context(pos, self._slot_mapping(tables, seq_of_token, pos), cu, lens, tables,
                                      inp.max_q, inp.is_decode))
            hidden = self.model(ids)
            reset_context()
        prompt = self._prompt_logprobs(hidden, inp) if inp.prompt_rows else None
        if not inp.sample_rows:
            return None, prompt
        sampled = inp.sample_rows
        # a decode step samples every row: a slice. Else the indices go up from pinned memory: a pageable
        # copy (torch.tensor(..., device=)) would make the host wait here for the whole forward.
        picked = hidden[: len(sampled)] if sampled[-1] == len(sampled) - 1 else hidden[self._to_device(sampled)]
        return self.model.compute_logits(picked), prompt

    def _prompt_logprobs(self, hidden: torch.Tensor, inp: StepInputs
                         ) -> tuple[list[float], list[list[float]], list[list[int]]] | None:
        """Per row of inp.prompt_rows, under the plain fp32 log-softmax of its raw logits (vLLM's prompt
        log-probs: no temperature, penalties, top-k / top-p): the log-prob of its target token and the
        inp.prompt_top most likely (log-probs, token ids), most likely first. The token's own log-prob and the
        top entries are read from one tensor: equal tokens get bit-identical values. inp.prompt_piece rows at a
        time (PROMPT_LOGITS_ELEMENTS); every rank computes the logits (a collective under TP), rank 0 reduces."""
        step = inp.prompt_piece
        own, top_lp, top_id = [], [], []
        for a in range(0, len(inp.prompt_rows), step):
            logits = self.model.compute_logits(hidden[self._to_device(inp.prompt_rows[a : a + step])])
            if self.rank != 0:
                continue
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            targets = self._to_device(inp.prompt_targets[a : a + step])
            own.append(logp.gather(1, targets[:, None]).squeeze(1))
            if inp.prompt_top:
                v, i = logp.topk(min(inp.prompt_top, logp.shape[-1]), dim=-1)
                top_lp.append(v)
                top_id.append(i)
            del logp
        if self.rank != 0:
            return None
        if not inp.prompt_top:
            return torch.cat(own).tolist(), [], []
        return torch.cat(own).tolist(), torch.cat(top_lp).tolist(), torch.cat(top_id).tolist()

    @staticmethod
    def _record_prompt_logprobs(prompt_seqs: list[tuple[Sequence, int]], prompt: tuple) -> None:
        """Append each sequence's new prompt log-prob entries ({token: log-prob, then its top N}), in position
        order (vLLM's dict: the prompt token first, then the most likely)."""
        own, top_lp, top_id = prompt
        j = 0
        for seq, count in prompt_seqs:
            n = seq.params.prompt_logprobs
            for _ in range(count):
                entry = {seq.token_ids[len(seq.prompt_logprobs)]: own[j]}
                if n:
                    entry.update(zip(top_id[j][:n], top_lp[j][:n], strict=True))
                seq.prompt_logprobs.append(entry)
                j += 1

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """One int64 host-to-device copy (from pinned memory on CUDA, so it does not wait for the device).
        Through numpy: torch.tensor of a Python list costs ~6x more per element (1,024 sequences x 5 values)."""
        t = torch.from_numpy(np.array(values, dtype=np.int64))
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]
            ) -> tuple[list[Sequence], list[int], list[float], list[dict[int, float] | None], list[str | None]]:
        """Forward the batch (on every rank); sample for every sequence whose last token was forwarded.
        Returns those sequences, their tokens, log-probs, top log-probs ({token: log-prob}) where asked, and
        per sequence None or why its distribution was broken (its token must not be used)."""
        inp, to_sample, prompt_seqs = self.prepare(batch)
        if self.workers is not None:
            self.workers.send(("run", inp))
        logits, prompt = self.execute(inp)
        if prompt is not None:
            self._record_prompt_logprobs(prompt_seqs, prompt)
        if not to_sample:
            return [], [], [], [], []
        dev = self.device
        p = [s.params for s in to_sample]
        eos = self.config.model_config.eos_token_ids
        for i, s in enumerate(to_sample):  # rare per-request logit changes, row by row
            x = s.params
            if x.presence_penalty or x.frequency_penalty or x.repetition_penalty != 1:
                _penalize(logits[i], s, x)
            if x.min_tokens and s.num_generated < x.min_tokens:  # what would end the completion cannot be sampled yet
                logits[i, x.stop_token_ids + ([] if x.ignore_eos else eos)] = float("-inf")
        # Below SAMPLING_EPS greedy: logits / T would overflow (1e-45 is a float32 denormal, not 0)
        floats = torch.from_numpy(np.array([[0.0 if x.temperature < SAMPLING_EPS else x.temperature for x in p],
                                            [x.top_p for x in p]], dtype=np.float32))
        floats = (floats.pin_memory() if dev.type == "cuda" else floats).to(dev, non_blocking=True)
        temperature, top_p = floats[0], floats[1]
        ints = self._to_device([x.top_k for x in p] + [s.seed for s in to_sample]
                               + [len(s.token_ids) for s in to_sample])
        top_k, seeds, positions = ints.view(3, -1)
        tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, positions,
                                  truncate=any(x.top_k > 0 or x.top_p < 1 for x in p))
        tops: list[dict[int, float] | None] = [None] * len(to_sample)
        rows = [i for i, x in enumerate(p) if x.top_logprobs > 0]
        if rows:  # only the rows that ask: the distribution is rebuilt over the whole vocabulary
            r = self._to_device(rows)
            lps, ids = top_logprobs(logits[r], temperature[r], top_k[r], top_p[r], max(p[i].top_logprobs for i in rows))
            for i, lp_row, id_row in zip(rows, lps.tolist(), ids.tolist(), strict=True):
                n = p[i].top_logprobs
                tops[i] = {t: lp for t, lp in zip(id_row[:n], lp_row[:n], strict=True) if lp != float("-inf")}
        lps = logprobs.tolist()
        # NaN anywhere in a row reaches its log-softmax normaliser, and only a row without a finite token
        # samples one at -inf: a non-finite log-prob marks a broken distribution. Checked on the host copy
        # the log-probs make anyway; only a broken row costs more (its diagnosis).
        errors = [None if math.isfinite(lp) else _why_broken(logits[i]) for i, lp in enumerate(lps)]
        return to_sample, tokens.tolist(), lps, tops, errors

    # ---- CUDA graphs for decode -----------------------------------------------------------------
    @torch.no_grad()  # no autograd state kept alive in the graphs' pool
    def _capture_graphs(self) -> None:
        t0 = time.perf_counter()
        max_bs = min(self.config.max_num_seqs, MAX_GRAPH_BATCH)
        # Every 16 up to 256, then coarser: padding a batch to its graph wastes at most 1/8 of it (1/16 below 512).
        steps = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32), *range(576, MAX_GRAPH_BATCH + 1, 64)]
        sizes = sorted({b for b in [*steps, max_bs] if b <= max_bs})
        dev, h = self.device, self.config.model_config.hidden_size
        # Static inputs, one copy per replay: token ids, positions, context lengths, block-table rows
        self.g_in = torch.zeros(4, max_bs, dtype=torch.long, device=dev)
        self.g_in[3].fill_(self.pad_row)
        self.h_in = torch.zeros(4, max_bs, dtype=torch.long, pin_memory=True)
        self.g_out = torch.zeros(max_bs, h, dtype=self.config.torch_dtype, device=dev)
        self.in_copied = torch.cuda.Event()
        pool = None
        for bs in reversed(sizes):
            self._decode_forward(bs)  # warm-up (allocations, autotuning)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._decode_forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        self.graph_sizes = sizes
        self.graph_capture_seconds = time.perf_counter() - t0

    def _decode_forward(self, bs: int) -> None:
        """The captured decode step: g_out[:bs] from g_in[:, :bs], the block tables gathered on the device."""
        ids, pos, lens, rows = self.g_in[:, :bs]
        lens = lens.to(torch.int32)
        # padding rows (context length 0) write their K/V and routing to no slot
        slots = torch.where(lens > 0, self._slot_mapping(self.block_tables, rows, pos), -1)
        set_context(self._context(pos, slots, None, lens, self.block_tables[rows], 1, True))
        self.g_out[:bs] = self.model(ids)
        reset_context()

    def release_graphs(self) -> None:
        """Drop the decode graphs: NCCL's shutdown waits for graphs that captured its collectives."""
        self.graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _replay(self, inp: StepInputs) -> torch.Tensor:
        n = len(inp.ids)
        bs = next(b for b in self.graph_sizes if b >= n)
        self.in_copied.synchronize()  # the previous replay's copy has read the host buffer (done long since)
        host = self.h_in.numpy()
        host[0, :n], host[1, :n], host[2, :n], host[3, :n] = inp.ids, inp.pos, inp.ctx_lens, inp.rows
        host[:3, n:bs] = 0
        host[3, n:bs] = self.pad_row
        self.g_in[:, :bs].copy_(self.h_in[:, :bs], non_blocking=True)
        self.in_copied.record()
        self.graphs[bs].replay()
        return self.g_out[:n]

    # ---- routing and weights --------------------------------------------------------------------
    def gather_routing(self, spans: list[tuple[int, int]]) -> Future:
        """Routing rows of positions 0..n-1 of each span's sequence (its block-table row, n), gathered on the
        device in one launch sequence from the device block tables, without a sync.

        Returns a Future of one numpy array per span (views of one host buffer per call, plain pageable
        memory: nothing pinned stays alive with them). On CUDA a copier thread moves the rows on its own
        stream once the gather has run, so the step loop never waits for it. Must be called before the
        sequences' table rows or blocks are reused: later steps are ordered after the gather on the stream.
        """
        lengths = [n for _, n in spans]
        table_rows, lens = self._to_device([r for r, _ in spans] + lengths).view(2, -1)
        total = sum(lengths)
        seg = torch.repeat_interleave(torch.arange(len(spans), device=self.device), lens, output_size=total)
        pos = torch.arange(total, device=self.device) - (torch.cumsum(lens, 0) - lens)[seg]
        rows = self.routing_cache[self._slot_mapping(self.block_tables, table_rows[seg], pos)]
        if self.device.type != "cuda":
            done: Future = Future()
            done.set_result(_split(rows.numpy(), lengths))
            return done
        gathered = torch.cuda.Event()
        gathered.record()
        return self._copier.submit(self._copy_routing, rows, gathered, lengths)

    def close(self) -> None:
        """Stop the routing copier thread once the copies it holds have landed."""
        if self.device.type == "cuda":
            self._copier.shutdown(wait=True)

    def _copy_routing(self, rows: torch.Tensor, gathered: torch.cuda.Event, lengths: list[int]) -> list[np.ndarray]:
        """On the copier thread: a pageable device-to-host copy on a side stream (the driver stages it),
        after the gather; ``rows`` is freed here once the copy has finished."""
        host = torch.empty(rows.shape, dtype=rows.dtype)  # pageable
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(gathered)
            host.copy_(rows)
        return _split(host.numpy(), lengths)

    def update_weights(self, named_tensors) -> int:
        if "weights" in self.released:  # their storages hold no memory: nothing may be written to them
            raise ValueError("update_weights: the weights are released: resume_memory (tags weights) first")
        items = list(named_tensors)
        if self.workers is None:
            return update_weights(self.model, items)
        # Every rank checks the same names and (unsharded) shapes: fail here, before a worker sees them.
        check_update(self.model, items)
        self.workers.send(("update_weights", [(n, tuple(t.shape), t.dtype) for n, t in items]))
        return self.sync_weights([n for n, _ in items], [t for _, t in items])

    def sync_weights(self, names: list[str], tensors: list) -> int:
        """Every rank, under tensor parallelism: rank 0 broadcasts each tensor (NCCL on GPUs, gloo on
        CPU) and every rank writes its shard, a chunk at a time, so no rank holds the model twice.
        Rank 0 passes the tensors, the workers their (shape, dtype)."""
        def received():
            for name, t in zip(names, tensors, strict=True):
                if isinstance(t, torch.Tensor):
                    buf = t.detach().to(self.device).contiguous()
                else:
                    buf = torch.empty(t[0], dtype=t[1], device=self.device)
                dist.broadcast(buf, src=0)
                yield name, buf

        return sum(update_weights(self.model, chunk) for chunk in in_chunks(received()))
