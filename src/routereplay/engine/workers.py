"""Tensor-parallel ranks 1..N-1: one process each, driven by rank 0 (the engine's process).

Rank 0 schedules, samples and records routing; every step it broadcasts the step's host-side
inputs (`StepInputs`) on a gloo control group, and all ranks run the same forward, whose
all-reduces go over NCCL on GPUs (gloo on CPU). The processes are daemons: they cannot outlive the
engine's process. ``Workers.run_everywhere`` runs a function on every rank at once (a weight-sync
group's join and receive: each rank a member of the trainer's group).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from datetime import timedelta
from multiprocessing import connection as mp_connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from routereplay.config import EngineConfig
from routereplay.layers.parallel import TP

_TIMEOUT = timedelta(seconds=120)
# The control group waits for rank 0's next message however long the engine idles (a trainer's step
# between two rollouts takes minutes): with _TIMEOUT a worker died after 120 idle seconds. A worker that
# died is still seen at once (rank 0's send fails), and the forward's collectives keep _TIMEOUT.
_IDLE_TIMEOUT = timedelta(days=365)


def _init(rank: int, size: int, rendezvous: str, cuda: bool):
    TP.rank, TP.size = rank, size
    if cuda:
        torch.cuda.set_device(rank)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (see the device notes)
    # One host: rendezvous through a file and keep the collectives' sockets on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}",
                            rank=rank, world_size=size, timeout=_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


def _worker_main(kwargs: dict, rank: int, size: int, rendezvous: str, ready) -> None:
    from routereplay.engine.model_runner import ModelRunner

    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    config = EngineConfig(**kwargs)
    ready.send(True)
    ready.close()
    ctrl = _init(rank, size, rendezvous, config.device.startswith("cuda"))
    runner = ModelRunner(config, rank)
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0, group=ctrl)
        command, payload = msg[0]
        if command == "run":
            runner.execute(payload)
        elif command == "update_weights":
            runner.sync_weights([name for name, _, _ in payload], [(shape, dtype) for _, shape, dtype in payload])
        elif command == "call":  # Workers.run_everywhere
            fn, args = payload
            try:
                outcome = (fn(runner, *args), None)
            except Exception as e:
                outcome = (None, f"{type(e).__name__}: {e}")
            dist.all_gather_object([None] * size, outcome, group=ctrl)
        else:
            break
    runner.release_graphs()
    dist.destroy_process_group()


class Workers:
    """Starts ranks 1..N-1 and joins the process group as rank 0 (call before building rank 0's runner)."""

    def __init__(self, config: EngineConfig) -> None:
        size = config.tensor_parallel_size
        fd, self.rendezvous = tempfile.mkstemp(prefix="routereplay-tp-")
        os.close(fd)
        os.remove(self.rendezvous)  # the file store creates it
        kwargs = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(1, size)]
        self.procs = [ctx.Process(target=_worker_main, args=(kwargs, r, size, self.rendezvous, send), daemon=True)
                      for r, (_, send) in zip(range(1, size), pipes, strict=True)]
        for p in self.procs:
            p.start()
        try:
            self._wait_until_started([recv for recv, _ in pipes])
            self.ctrl = _init(0, size, self.rendezvous, config.device.startswith("cuda"))
        except BaseException as e:
            codes = [p.exitcode for p in self.procs]
            self.close(graceful=False)
            raise RuntimeError(f"tensor-parallel workers did not join (exit codes {codes}): {e}") from e

    def _wait_until_started(self, pipes: list) -> None:
        """Fail at once, not after the rendezvous timeout, if a worker dies before it joins."""
        waiting = dict(zip(pipes, self.procs, strict=True))
        while waiting:
            if not mp_connection.wait(list(waiting) + [p.sentinel for p in waiting.values()],
                                      timeout=_TIMEOUT.total_seconds()):
                raise TimeoutError(f"workers still starting after {_TIMEOUT.total_seconds():.0f} s")
            for pipe, proc in list(waiting.items()):
                if pipe.poll():
                    del waiting[pipe]
                elif not proc.is_alive():
                    raise RuntimeError(
                        f"worker {proc.name} exited with code {proc.exitcode} before joining (its traceback is "
                        "above; a script that starts tensor-parallel workers needs `if __name__ == '__main__':`)")

    def send(self, msg: tuple) -> None:
        try:
            dist.broadcast_object_list([msg], src=0, group=self.ctrl)
        except Exception as e:
            gone = {rank: p.exitcode for rank, p in enumerate(self.procs, 1) if not p.is_alive()}
            if not gone:
                raise
            raise RuntimeError(f"tensor-parallel worker(s) gone (rank: exit code) {gone}; close this LLM") from e

    def run_everywhere(self, fn, *args, local) -> list[tuple[object, str | None]]:
        """``fn(runner, *args)`` on every worker (a module-level function: it is pickled by name) while
        rank 0 runs ``local()`` here, at the same time; then each rank's outcome, in rank order:
        (result, None) or (None, "ErrorType: message"). Rank 0's result stays here (it need not pickle);
        the workers' results must pickle. An exception of ``fn`` is reported, the worker lives on."""
        self.send(("call", (fn, args)))
        try:
            mine: tuple[object, str | None] = (local(), None)
        except Exception as e:
            mine = (None, f"{type(e).__name__}: {e}")
        outcomes: list = [None] * (len(self.procs) + 1)
        dist.all_gather_object(outcomes, (None, mine[1]), group=self.ctrl)
        outcomes[0] = mine
        return outcomes

    def close(self, graceful: bool = True) -> None:
        if graceful and dist.is_initialized():
            try:
                self.send(("exit", None))
            except Exception:
                graceful = False
        if graceful and dist.is_initialized():
            # NCCL's shutdown waits for every rank: destroy together with the workers, then join them.
            dist.destroy_process_group()
        for p in self.procs:
            p.join(timeout=30 if graceful else 0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        if dist.is_initialized():  # a worker failed: its peers are gone, so abort rather than shut down
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        if os.path.exists(self.rendezvous):
            os.remove(self.rendezvous)
        TP.rank, TP.size = 0, 1
