"""The engine's side of a trainer's weight-sync group (SGLang's /init_weights_update_group layout): every
tensor-parallel rank joins as ``rank_offset + tp_rank`` and receives each broadcast into its own shard."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from routereplay.layers.parallel import TP
from routereplay.models.loader import check_update, in_chunks
from routereplay.models.loader import update_weights as load_into
from routereplay.weight_sync import DEFAULT_TIMEOUT_S, WeightGroupError, _check, make_group


@dataclass(eq=False)
class WeightGroup:
    """A weight-sync group an engine joined (:func:`join_weight_group`): its tensor-parallel rank r is rank
    ``rank_offset + r``. ``group`` is rank 0's member (this process); the workers keep theirs."""

    group: dist.ProcessGroup
    group_name: str
    rank_offset: int
    world_size: int
    backend: str
    timeout_s: float
    tp_size: int


_RANK_GROUPS: dict[str, dist.ProcessGroup] = {}  # a tensor-parallel worker process's members, by group name


def check_weight_group(engine, rank_offset: int, world_size: int, backend: str = "nccl",
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """ValueError (nothing joined) unless every tensor-parallel rank of ``engine`` fits: ranks
    ``rank_offset .. rank_offset + tp_size - 1`` in ``[1, world_size)`` (rank 0 is the trainer)."""
    _check(backend, timeout_s)
    tp = engine.config.tensor_parallel_size
    if rank_offset < 1:
        raise ValueError(f"rank_offset must be >= 1 (rank 0 is the trainer), got {rank_offset}")
    if rank_offset + tp > world_size:
        raise ValueError(f"world_size={world_size} leaves no room for this server's {tp} tensor-parallel rank"
                         f"{'s' if tp > 1 else ''} at rank_offset={rank_offset} (ranks {rank_offset}.."
                         f"{rank_offset + tp - 1}): world_size must count every rank of every engine, plus 1")


def _failures(outcomes: list[tuple[Any, str | None]]) -> str:
    return "; ".join(f"tensor-parallel rank {r}: {err}" for r, (_, err) in enumerate(outcomes) if err is not None)


def join_weight_group(engine, master_address: str, master_port: int, rank_offset: int, world_size: int,
                      group_name: str = "weight_update_group", backend: str = "nccl",
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> WeightGroup:
    """Join the trainer's group with every tensor-parallel rank of ``engine`` (rank ``rank_offset + r``), as
    SGLang does; blocks until the group has formed, at most ``timeout_s``.

    Under tensor parallelism call it on the engine thread (it tells the workers through their control
    group, between two steps); with one rank it touches no engine state and may run on any thread.
    Raises ValueError (:func:`check_weight_group`) before any rendezvous, or :class:`WeightGroupError`:
    then no rank is left in the group."""
    check_weight_group(engine, rank_offset, world_size, backend, timeout_s)
    spec = (master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)
    tp = engine.config.tensor_parallel_size
    workers = engine.runner.workers

    def mine() -> dist.ProcessGroup:
        return make_group(master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)

    if workers is None:
        return WeightGroup(mine(), group_name, rank_offset, world_size, backend, timeout_s, tp)
    outcomes = workers.run_everywhere(_join_on_rank, spec, local=mine)
    if any(err is not None for _, err in outcomes):
        if outcomes[0][0] is not None:
            outcomes[0][0].shutdown()
        workers.run_everywhere(_leave_on_rank, group_name, local=lambda: None)
        raise WeightGroupError(_failures(outcomes))
    return WeightGroup(outcomes[0][0], group_name, rank_offset, world_size, backend, timeout_s, tp)


def leave_weight_group(engine, handle: WeightGroup | dist.ProcessGroup) -> None:
    """Every rank leaves the group (under tensor parallelism on the engine thread, as join_weight_group)."""
    group = handle.group if isinstance(handle, WeightGroup) else handle
    try:
        if isinstance(handle, WeightGroup) and handle.tp_size > 1 and engine.runner.workers is not None:
            engine.runner.workers.run_everywhere(_leave_on_rank, handle.group_name, local=lambda: None)
    finally:
        group.shutdown()


def _join_on_rank(runner, spec: tuple) -> None:
    """(a tensor-parallel worker) join as rank rank_offset + this rank."""
    master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s = spec
    if group_name in _RANK_GROUPS:
        raise ValueError(f"group_name {group_name!r} exists already on this rank")
    _RANK_GROUPS[group_name] = make_group(master_address, master_port, rank_offset + TP.rank, world_size,
                                          group_name, backend, timeout_s)


def _leave_on_rank(runner, group_name: str) -> None:
    group = _RANK_GROUPS.pop(group_name, None)
    if group is not None:
        group.shutdown()


def _receive_on_rank(runner, group_name: str, names: list[str], dtypes: list[torch.dtype],
                     shapes: list[list[int]], write: bool) -> int:
    group = _RANK_GROUPS.get(group_name)
    if group is None:
        raise ValueError(f"group_name {group_name!r}: this rank is not in it")
    return _receive_into(runner.device, group, names, dtypes, shapes,
                         (lambda chunk: load_into(runner.model, chunk)) if write else None)


def _receive_into(device: torch.device, group: dist.ProcessGroup, names: list[str], dtypes: list[torch.dtype],
                  shapes: list[list[int]], write: Callable[[list], int] | None) -> int:
    """Receive every broadcast, in names order, and ``write`` it (this rank's shard) about 1 GB at a time,
    or discard it (``write`` None). Returns what ``write`` wrote."""
    def received():
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            buf = torch.empty(shape, dtype=dtype, device=device)
            group.broadcast(buf, 0).wait()
            yield name, buf

    written = 0
    for chunk in in_chunks(received()):
        if write is not None:
            written += write(chunk)
    return written


def receive_weights(engine, group: WeightGroup | dist.ProcessGroup, names: list[str],
                    dtypes: list[torch.dtype], shapes: list[list[int]]) -> int:
    """Receive the trainer's broadcasts (in ``names`` order) and load them into ``engine``; returns the
    number of tensors written. Names and shapes are checked first; if they are wrong, every broadcast is
    still received (the trainer must not hang) and discarded on every rank, then ValueError: nothing is
    written. Runs on the engine thread, between two steps.

    ``group`` from :func:`join_weight_group`: under tensor parallelism every rank receives each tensor
    itself and writes its own shard. A bare process group (:func:`make_group`, rank 0 alone) is the older
    layout: rank 0 receives and hands the tensors to the other ranks over the engine's own group."""
    try:
        if "weights" in engine.released:  # they would be written into freed storage
            raise ValueError("the weights are released: /resume_memory_occupation (tags weights) first")
        check_update(engine.runner.model, [(n, torch.empty(s, dtype=d, device="meta"))
                                           for n, s, d in zip(names, shapes, dtypes, strict=True)])
        error = None
    except ValueError as e:
        error = e
    runner = engine.runner
    if isinstance(group, WeightGroup) and group.tp_size > 1:
        outcomes = runner.workers.run_everywhere(
            _receive_on_rank, group.group_name, names, dtypes, shapes, error is None,
            local=lambda: _receive_into(runner.device, group.group, names, dtypes, shapes,
                                        None if error is not None else (lambda chunk: load_into(runner.model, chunk))))
        if error is None:
            engine.reset_prefix_cache()  # computed with the old weights
        if any(err is not None for _, err in outcomes):
            raise RuntimeError(f"update_weights_from_distributed: {_failures(outcomes)}")
        if error is not None:
            raise error
        return outcomes[0][0]
    # one rank, or a bare group of rank 0 alone: the engine's update_weights (which hands the workers theirs)
    written = _receive_into(runner.device, group.group if isinstance(group, WeightGroup) else group, names,
                            dtypes, shapes, None if error is not None else engine.update_weights)
    if error is not None:
        raise error
    return written


