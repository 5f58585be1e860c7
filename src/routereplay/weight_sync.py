"""Weight sync from a trainer over a process group, without a checkpoint on disk (SGLang's
``/init_weights_update_group`` and ``/update_weights_from_distributed``).

The trainer (rank 0) hosts the rendezvous and broadcasts each tensor in the order of the names it
posted; the rollout server (one rank, whatever its tensor-parallel size) receives them between two
engine steps and loads them 1 GB at a time. Trainer side::

    sender = WeightSender("http://rollout-host:8000", master_address="trainer-host", master_port=29600)
    sender.send(model.named_parameters())  # after each optimizer step
    sender.close()

A group that does not form fails on both sides within ``timeout_s`` (the rendezvous and every
collective wait at most that long) instead of hanging: the server answers
``/init_weights_update_group`` with a 400 and :class:`WeightSender` raises as soon as the server
refuses, leaving no store or port behind.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import httpx
import torch
import torch.distributed as dist

from routereplay.models.loader import check_update, in_chunks

DEFAULT_TIMEOUT_S = 60.0  # rendezvous + any one collective; SGLang waits far longer, which hides a dead peer
_BACKENDS = ("gloo", "nccl")


class WeightGroupError(RuntimeError):
    """A weight-sync group that did not form (or a server that refused to join it)."""


def _where(group_name: str, master_address: str, master_port: int, rank: int, world_size: int,
           timeout_s: float) -> str:
    return (f"weight-sync group {group_name!r} (rank {rank} of {world_size}, rendezvous "
            f"{master_address}:{master_port}, timeout {timeout_s:g} s)")


def _store(master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float,
           wait_for_workers: bool) -> dist.TCPStore:
    return dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=wait_for_workers)


def _await_master(master_address: str, master_port: int, timeout_s: float) -> None:
    """Wait until rank 0's store accepts connections, for at most timeout_s: a TCPStore client on its own
    retries once after a random delay and may take up to twice its timeout to give up."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((master_address, master_port), timeout=max(0.05, min(1.0, left))):
                return
        except OSError as e:
            if time.monotonic() + 0.05 >= deadline:
                raise dist.DistNetworkError(f"nobody hosts the rendezvous ({type(e).__name__}: {e})") from None
            time.sleep(0.05)


def _group(store: dist.Store, rank: int, world_size: int, group_name: str, backend: str,
           timeout_s: float) -> dist.ProcessGroup:
    prefixed = dist.PrefixStore(f"{group_name}/", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout  # NCCL's watchdog then aborts a collective stuck longer than this
    return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)


def _check(backend: str, timeout_s: float) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("backend nccl: this torch build has no NCCL; use gloo")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")


def make_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
               backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.ProcessGroup:
    """A process group of its own (a tensor-parallel engine's group is left alone): a TCP store at
    master_address:master_port, hosted by rank 0, keys under ``group_name/`` as torch's named groups
    (the group SGLang's ``/init_weights_update_group`` joins).

    Blocks until every rank has joined, at most ``timeout_s`` seconds (which is also the group's
    collective timeout); a group that does not form raises :class:`WeightGroupError` naming the
    rendezvous, and whatever was made of it is released (rank 0's port is free again)."""
    _check(backend, timeout_s)
    store = None
    try:
        if rank != 0:
            _await_master(master_address, master_port, timeout_s)
        store = _store(master_address, master_port, rank, world_size, timeout_s, wait_for_workers=True)
        return _group(store, rank, world_size, group_name, backend, timeout_s)
    except dist.DistError as e:
        del store  # released now (a rank 0 frees its port), not with the exception, whose traceback holds this frame
        where = _where(group_name, master_address, master_port, rank, world_size, timeout_s)
        raise WeightGroupError(f"{where} did not form: {e}") from None


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtypes: {name!r} is not a torch dtype")
    return dtype


def receive_weights(engine, group: dist.ProcessGroup, names: list[str], dtypes: list[torch.dtype],
                    shapes: list[list[int]]) -> int:
    """Receive the trainer's broadcasts (in ``names`` order) and load them into ``engine``; returns the
    number of tensors written. Names and shapes are checked first; if they are wrong, every broadcast is
    still received (the trainer must not hang) and discarded, then ValueError: nothing is written."""
    try:
        check_update(engine.runner.model, [(n, torch.empty(s, device="meta")) for n, s in zip(names, shapes,
                                                                                              strict=True)])
        error = None
    except ValueError as e:
        error = e

    def received():
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            buf = torch.empty(shape, dtype=dtype, device=engine.runner.device)
            group.broadcast(buf, 0).wait()
            yield name, buf

    written = 0
    for chunk in in_chunks(received()):
        if error is None:
            written += engine.update_weights(chunk)
    if error is not None:
        raise error
    return written


def _in_background(fn: Callable[[], Any]) -> Future:
    """Run ``fn`` on a daemon thread (a refused or stuck HTTP call must not hold up the caller or its exit)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=run, name="weight-sync-http", daemon=True).start()
    return future


class WeightSender:
    """The trainer's end of SGLang's ``/init_weights_update_group`` protocol: joins ``url``'s server into
    a process group (rank 0 here, the server rank 1) and broadcasts weights to it with
    ``/update_weights_from_distributed``. ``backend``: "nccl" when the trainer's tensors are on a GPU.

    ``timeout_s`` bounds the rendezvous and each broadcast (give the server's ``--weight-group-timeout``
    the same order); ``http_timeout_s`` bounds each HTTP call, a whole ``send`` included. If the server
    refuses the group (any non-2xx answer, e.g. 400 "group_name ... exists already" when an earlier
    sender died without ``close()``), the constructor raises :class:`WeightGroupError` with the server's
    message at once, and the rendezvous it hosted is gone (its port is free again)."""

    def __init__(self, url: str, master_address: str = "127.0.0.1", master_port: int = 29600,
                 group_name: str = "routereplay_weights", backend: str = "gloo",
                 timeout_s: float = DEFAULT_TIMEOUT_S, http_timeout_s: float = 600) -> None:
        _check(backend, timeout_s)
        self.url, self.group_name, self.http_timeout_s = url.rstrip("/"), group_name, http_timeout_s
        self.group: dist.ProcessGroup | None = None
        where = _where(group_name, master_address, master_port, 0, 2, timeout_s)
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": 1, "world_size": 2,
                "group_name": group_name, "backend": backend}
        try:  # host the rendezvous first, without waiting: the server's rank then joins it
            store = _store(master_address, master_port, 0, 2, timeout_s, wait_for_workers=False)
        except dist.DistError as e:
            raise WeightGroupError(f"{where}: cannot host the rendezvous: {e}") from None
        try:
            reply = _in_background(lambda: self._post("/init_weights_update_group", body,
                                                      timeout=timeout_s + http_timeout_s))
            deadline = time.monotonic() + timeout_s
            while store.num_keys() == 0:  # the server's store client adds a key as it joins
                if reply.done():  # answered before joining: refused (raises its message) or not a server
                    reply.result()
                    raise WeightGroupError(f"{where}: the server answered without joining the group")
                if time.monotonic() > deadline:
                    raise WeightGroupError(f"{where}: the server did not join within {timeout_s:g} s")
                time.sleep(0.005)
            try:
                self.group = _group(store, 0, 2, group_name, backend, timeout_s)
            except dist.DistError as e:
                raise WeightGroupError(f"{where} did not form: {e}") from None
            reply.result(timeout=timeout_s + http_timeout_s)
        except BaseException as e:
            if self.group is not None:
                self.group.shutdown()
            self.group = None
            del store  # the rendezvous goes with the last reference: the port is free when this raises
            if isinstance(e, Exception) and not isinstance(e, WeightGroupError):
                raise WeightGroupError(f"{where}: {e}") from None  # e.g. the server's refusal (see _post)
            raise

    def _post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        try:
            r = httpx.post(self.url + path, json=body, timeout=self.http_timeout_s if timeout is None else timeout)
        except httpx.HTTPError as e:
            raise RuntimeError(f"{path}: {type(e).__name__}: {e}") from None
        if not r.is_success:
            raise RuntimeError(f"{path}: {r.status_code} {r.text}")
        return r.json()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Broadcast these tensors (any subset of the weights, transformers or checkpoint names); returns
        how many the server wrote. A wrong name or shape raises RuntimeError and the server keeps its weights."""
        if self.group is None:
            raise WeightGroupError(f"weight-sync group {self.group_name!r} is closed")
        items = [(name, t.detach().contiguous()) for name, t in named_tensors]
        body = {"names": [n for n, _ in items], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in items],
                "shapes": [list(t.shape) for _, t in items], "group_name": self.group_name}
        reply = _in_background(lambda: self._post("/update_weights_from_distributed", body))
        for _, t in items:
            work = self.group.broadcast(t, 0)
            while not work.is_completed():
                if reply.done() and reply.exception() is not None:  # the server never started receiving
                    raise RuntimeError(f"{reply.exception()}; this sender's group is unusable now")
                time.sleep(1e-3)
            work.wait()  # raises if the broadcast failed (e.g. timed out)
        return reply.result(timeout=self.http_timeout_s)["num_tensors"]

    def close(self) -> None:
        """The server leaves the group first; then this end, which hosts the rendezvous, shuts it down
        (the port is free once this returns). Calling it again does nothing."""
        if self.group is None:
            return
        try:
            self._post("/destroy_weights_update_group", {"group_name": self.group_name})
        finally:
            self.group.shutdown()
            self.group = None

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
