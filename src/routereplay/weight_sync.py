"""Weight sync from a trainer over a process group, without a checkpoint on disk (SGLang's
``/init_weights_update_group`` and ``/update_weights_from_distributed``).

The trainer (rank 0) hosts the rendezvous and broadcasts each tensor in the order of the names it
posted; the rollout server (one rank, whatever its tensor-parallel size) receives them between two
engine steps and loads them 1 GB at a time. Trainer side::

    sender = WeightSender("http://rollout-host:8000", master_address="trainer-host", master_port=29600)
    sender.send(model.named_parameters())  # after each optimizer step
    sender.close()
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import torch
import torch.distributed as dist

from routereplay.models.loader import check_update, in_chunks

_TIMEOUT = timedelta(seconds=600)


def make_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
               backend: str) -> dist.ProcessGroup:
    """A process group of its own (a tensor-parallel engine's group is left alone): a TCP store at
    master_address:master_port, hosted by rank 0, keys under ``group_name/`` as torch's named groups."""
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=_TIMEOUT)
    prefixed = dist.PrefixStore(f"{group_name}/", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, _TIMEOUT)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size)
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


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


class WeightSender:
    """The trainer's end: joins ``url``'s server into a process group (rank 0 here, the server rank 1)
    and broadcasts weights to it. ``backend``: "nccl" when the trainer's tensors are on a GPU."""

    def __init__(self, url: str, master_address: str = "127.0.0.1", master_port: int = 29600,
                 group_name: str = "routereplay_weights", backend: str = "gloo", timeout: float = 600) -> None:
        self.url, self.group_name, self.timeout = url.rstrip("/"), group_name, timeout
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": 1, "world_size": 2,
                "group_name": group_name, "backend": backend}
        with ThreadPoolExecutor(1) as pool:  # the server joins while this process hosts the rendezvous
            reply = pool.submit(self._post, "/init_weights_update_group", body)
            self.group = make_group(master_address, master_port, 0, 2, group_name, backend)
            reply.result()

    def _post(self, path: str, body: dict) -> dict:
        r = httpx.post(self.url + path, json=body, timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text}")
        return r.json()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Broadcast these tensors (any subset of the weights, transformers or checkpoint names); returns
        how many the server wrote. A wrong name or shape raises RuntimeError and the server keeps its weights."""
        items = [(name, t.detach().contiguous()) for name, t in named_tensors]
        body = {"names": [n for n, _ in items], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in items],
                "shapes": [list(t.shape) for _, t in items], "group_name": self.group_name}
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(self._post, "/update_weights_from_distributed", body)
            for _, t in items:
                work = self.group.broadcast(t, 0)
                while not work.is_completed():
                    if reply.done() and reply.exception() is not None:  # the server never started receiving
                        raise RuntimeError(f"{reply.exception()}; this sender's group is unusable now")
                    time.sleep(1e-3)
            return reply.result()["num_tensors"]

    def close(self) -> None:
        """The server leaves the group first; then this end, which hosts the rendezvous, shuts it down."""
        try:
            self._post("/destroy_weights_update_group", {"group_name": self.group_name})
        finally:
            self.group.shutdown()
