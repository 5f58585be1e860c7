"""Weight sync from a trainer over a process group, without a checkpoint on disk (SGLang's
``/init_weights_update_group`` and ``/update_weights_from_distributed``).

The group is built exactly as SGLang's ``init_custom_process_group`` builds it (the helper slime, OpenRLHF,
AReaL and SkyRL copy into their trainers): a TCP store hosted by the trainer (rank 0), under
``PrefixStore(group_name)``, then torch's ``_new_process_group_helper`` prefixes ``group_name + "/"`` and
the device (``cpu/`` for gloo, ``cuda/`` for nccl). So gloo's rank addresses sit at
``/{group}/{group}//cpu//0/{rank}``: a trainer of any of those frameworks joins this server, and
:class:`WeightSender` joins a real SGLang server. A server of tensor-parallel size N joins as ranks
``rank_offset .. rank_offset + N - 1``, one per tensor-parallel rank, and each rank receives every
broadcast into its own shard (the trainer's ``world_size`` counts all of them, SGLang's layout).
Trainer side::

    sender = WeightSender("http://rollout-host:8000", master_address="trainer-host", master_port=29600)
    sender.send(model.named_parameters())  # after each optimizer step
    sender.close()

Server side: ``LLMEngine.join_weight_group``, ``receive_weights``, ``leave_weight_group``
(``engine/weight_group.py``), which use :func:`make_group` on every rank.

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

DEFAULT_TIMEOUT_S = 60.0  # rendezvous + any one collective; SGLang waits far longer, which hides a dead peer
_BACKENDS = ("gloo", "nccl")


class WeightGroupError(RuntimeError):
    """A weight-sync group that did not form (or a server that refused to join it)."""


def _where(group_name: str, master_address: str, master_port: int, rank: int | str, world_size: int,
           timeout_s: float) -> str:
    return (f"weight-sync group {group_name!r} (rank {rank} of {world_size}, rendezvous "
            f"{master_address}:{master_port}, timeout {timeout_s:g} s)")


def _store(master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float,
           wait_for_workers: bool) -> dist.TCPStore:
    # world_size on every rank: each client counts itself in (the store's "init/" key), and a master made
    # by torch's rendezvous("tcp://...") -- SGLang's trainers -- waits until all world_size have.
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


def _local_address(master_address: str, master_port: int) -> str | None:
    """This host's address on the route to master_address (a UDP connect sends nothing), or None."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(master_address, master_port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(where)
            return s.getsockname()[0]
    except OSError:
        return None


def _group(store: dist.Store, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float,
           address: str | None) -> dist.ProcessGroup:
    """The backend over SGLang's prefix chain (see the module docstring); gloo binds to ``address`` (the
    interface towards the rendezvous: a tensor-parallel process has GLOO_SOCKET_IFNAME=lo for its own
    group, and a host name may resolve to 127.0.1.1, both unreachable for a trainer elsewhere)."""
    named = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address) if address
                            else dist.ProcessGroupGloo.create_default_device()]
        options._threads = 2  # what torch gives one device
        options.global_ranks_in_group, options.group_name = [], group_name
        pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", named), rank, world_size, options)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout  # NCCL's watchdog then aborts a collective stuck longer than this
        options.global_ranks_in_group, options.group_name = [], group_name
        pg = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", named), rank, world_size, options)
    pg._set_sequence_number_for_group()  # as _new_process_group_helper does
    return pg


def _check(backend: str, timeout_s: float) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("backend nccl: this torch build has no NCCL; use gloo")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")


def make_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
               backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.ProcessGroup:
    """One rank's member of a process group of its own (a tensor-parallel engine's group is left alone),
    built as SGLang's ``init_custom_process_group``: a TCP store at master_address:master_port hosted by
    rank 0, keys under ``{group_name}/{group_name}//cpu/`` (gloo) or ``.../cuda/`` (nccl).

    Blocks until every rank has joined, at most ``timeout_s`` seconds (which is also the group's
    collective timeout); a group that does not form raises :class:`WeightGroupError` naming the
    rendezvous, and whatever was made of it is released (rank 0's port is free again)."""
    _check(backend, timeout_s)
    store = None
    try:
        if rank != 0:
            _await_master(master_address, master_port, timeout_s)
        store = _store(master_address, master_port, rank, world_size, timeout_s, wait_for_workers=True)
        return _group(store, rank, world_size, group_name, backend, timeout_s,
                      _local_address(master_address, master_port))
    except (dist.DistError, RuntimeError) as e:  # gloo's connectFullMesh raises a plain RuntimeError
        del store  # released now (a rank 0 frees its port), not with the exception, whose traceback holds this frame
        where = _where(group_name, master_address, master_port, rank, world_size, timeout_s)
        raise WeightGroupError(f"{where} did not form: {e}") from None


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtypes: {name!r} is not a torch dtype")
    return dtype


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


def _server_ranks(url: str, timeout_s: float) -> int:
    """The server's tensor-parallel size from SGLang's ``/server_info`` (or ``/get_server_info``): the
    ranks it joins with. 1 when it answers neither (a wrong guess is refused by the server, with its reason)."""
    for path in ("/server_info", "/get_server_info"):
        try:
            r = httpx.get(url + path, timeout=timeout_s)
            if r.is_success:
                tp = r.json().get("tp_size", 1)
                return tp if isinstance(tp, int) and tp >= 1 else 1
        except (httpx.HTTPError, ValueError, AttributeError):
            return 1
    return 1


class WeightSender:
    """The trainer's end of SGLang's ``/init_weights_update_group`` protocol: joins ``url``'s server into
    a process group (rank 0 here; the server's tensor-parallel ranks 1..N, each receiving for its own
    shard) and broadcasts weights to it with ``/update_weights_from_distributed``. The group is laid out as
    SGLang's ``init_custom_process_group`` lays it out, so the server may be routereplay or SGLang.
    ``backend``: "nccl" when the trainer's tensors are on a GPU. ``server_ranks``: the server's
    tensor-parallel size (the group's world size is that + 1); None reads ``tp_size`` from its
    ``/server_info``.

    ``timeout_s`` bounds the rendezvous and each broadcast (give the server's ``--weight-group-timeout``
    the same order); ``http_timeout_s`` bounds each HTTP call, a whole ``send`` included. If the server
    refuses the group (any non-2xx answer, e.g. 400 "group_name ... exists already" when an earlier
    sender died without ``close()``), the constructor raises :class:`WeightGroupError` with the server's
    message at once, and the rendezvous it hosted is gone (its port is free again)."""

    def __init__(self, url: str, master_address: str = "127.0.0.1", master_port: int = 29600,
                 group_name: str = "routereplay_weights", backend: str = "gloo",
                 timeout_s: float = DEFAULT_TIMEOUT_S, http_timeout_s: float = 600,
                 server_ranks: int | None = None) -> None:
        _check(backend, timeout_s)
        self.url, self.group_name, self.http_timeout_s = url.rstrip("/"), group_name, http_timeout_s
        self.group: dist.ProcessGroup | None = None
        if server_ranks is None:
            server_ranks = _server_ranks(self.url, min(timeout_s, http_timeout_s))
        world_size = 1 + server_ranks
        where = _where(group_name, master_address, master_port, 0, world_size, timeout_s)
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": 1,
                "world_size": world_size, "group_name": group_name, "backend": backend}
        try:  # host the rendezvous first, without waiting: the server's ranks then join it
            store = _store(master_address, master_port, 0, world_size, timeout_s, wait_for_workers=False)
        except dist.DistError as e:
            raise WeightGroupError(f"{where}: cannot host the rendezvous: {e}") from None
        try:
            reply = _in_background(lambda: self._post("/init_weights_update_group", body,
                                                      timeout=timeout_s + http_timeout_s))
            deadline = time.monotonic() + timeout_s
            while store.num_keys() == 0:  # a server rank's store client adds a key as it joins
                if reply.done():  # answered before joining: refused (raises its message) or not a server
                    reply.result()
                    raise WeightGroupError(f"{where}: the server answered without joining the group")
                if time.monotonic() > deadline:
                    raise WeightGroupError(f"{where}: the server did not join within {timeout_s:g} s")
                time.sleep(0.005)
            try:
                self.group = _group(store, 0, world_size, group_name, backend, timeout_s,
                                    _local_address(master_address, master_port))
            except (dist.DistError, RuntimeError) as e:
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
        self._store = store  # an NCCL group meets through it at its first broadcast

    def _post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        try:
            r = httpx.post(self.url + path, json=body, timeout=self.http_timeout_s if timeout is None else timeout)
        except httpx.HTTPError as e:
            raise RuntimeError(f"{path}: {type(e).__name__}: {e}") from None
        if not r.is_success:
            raise RuntimeError(f"{path}: {r.status_code} {r.text}")
        return r.json()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None) -> int:
        """Broadcast these tensors (any subset of the weights, transformers or checkpoint names); returns
        how many the server wrote (SGLang, which does not say, wrote them all). A wrong name or shape raises
        RuntimeError and the server keeps its weights. ``weight_version``: what the server reports next."""
        if self.group is None:
            raise WeightGroupError(f"weight-sync group {self.group_name!r} is closed")
        items = [(name, t.detach().contiguous()) for name, t in named_tensors]
        body = {"names": [n for n, _ in items], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in items],
                "shapes": [list(t.shape) for _, t in items], "group_name": self.group_name}
        if weight_version is not None:
            body["weight_version"] = weight_version
        reply = _in_background(lambda: self._post("/update_weights_from_distributed", body))
        for _, t in items:
            work = self.group.broadcast(t, 0)
            while not work.is_completed():
                if reply.done() and reply.exception() is not None:  # the server never started receiving
                    raise RuntimeError(f"{reply.exception()}; this sender's group is unusable now")
                time.sleep(1e-3)
            work.wait()  # raises if the broadcast failed (e.g. timed out)
        answer = reply.result(timeout=self.http_timeout_s)
        if answer.get("success") is False:
            raise RuntimeError(f"/update_weights_from_distributed: {answer.get('message')}")
        return answer.get("num_tensors", len(items))

    def close(self) -> None:
        """The server leaves the group first; then this end, which hosts the rendezvous, shuts it down
        (the port is free once this returns). Calling it again does nothing."""
        if self.group is None:
            return
        try:
            self._post("/destroy_weights_update_group", {"group_name": self.group_name})
        finally:
            self.group.shutdown()
            self.group = self._store = None

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
