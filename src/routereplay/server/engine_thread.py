"""The one thread that owns the LLMEngine (it is not thread-safe): it alone adds, steps and aborts requests
and runs control calls between two steps; handlers reach it through a queue and hear back through their
own asyncio queues."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from routereplay.engine.llm_engine import LLMEngine
from routereplay.outputs import RequestOutput
from routereplay.sampling_params import SamplingParams

log = logging.getLogger("routereplay.server")

# ---- the engine thread ------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class Job:
    """One engine request; ``events`` is shared by all jobs of one HTTP request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    prompt_index: int | None = None  # its place in a batch sharing one rollout id (store keys R/j/i)

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


_STOP = ("stop", None)


class EngineThread:
    """The only thread that touches the LLMEngine.

    Events sent to a job's queue: ``("delta", rid, sample, token_ids, logprobs, top_logprobs)`` (streaming jobs),
    ``("done", rid, RequestOutput)`` or ``("error", rid, message, HTTP status)``.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[str, Job] = {}
        self._thread = threading.Thread(target=self._run, name="routereplay-engine", daemon=True)
        self.failed: str | None = None
        self.pending = 0  # submitted, not yet taken by the engine thread
        self.paused = False  # written by the engine thread only: no step runs while set
        self.last_step = 0.0  # time.monotonic() at the end of the last engine step
        self._pending_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failed is None

    def submit(self, job: Job) -> None:
        with self._pending_lock:
            self.pending += 1
        self._inbox.put(("add", job))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn, done) -> None:
        """Run ``fn(engine)`` on the engine thread between two steps; then ``done(result, error message)``."""
        self._inbox.put(("call", (fn, done)))

    def stop(self, timeout: float | None = None) -> None:
        """Fail what is still in flight and end the thread (the caller closes the engine). With ``timeout``
        it returns then even if a step is still running (the thread is a daemon)."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in the engine loop: fail loudly, never hang clients
            self.failed = f"engine thread died: {type(e).__name__}: {e}"
            log.exception("engine thread died")
            self._fail_all(self.failed)
            self._reject_queued([], self.failed, 503)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            # Idle: block on the inbox. Busy: take whatever arrived and step again.
            cmds = [] if engine.has_unfinished() and not self.paused else [self._inbox.get()]
            while True:
                try:
                    cmds.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for i, (kind, arg) in enumerate(cmds):
                if kind == "stop":
                    self._shutdown(cmds[i + 1 :])
                    return
                if kind == "add":
                    with self._pending_lock:
                        self.pending -= 1
                    self._add(arg)
                elif kind == "abort" and self._jobs.pop(arg, None) is not None:
                    engine.abort(arg)
                elif kind == "call":
                    fn, done = arg
                    try:
                        result = fn(engine)
                    except Exception as e:
                        done(None, f"{type(e).__name__}: {e}")
                    else:
                        done(result, None)
            if engine.has_unfinished() and not self.paused:
                try:
                    finished = engine.step()
                except Exception as e:
                    log.exception("engine step failed; failing %d in-flight requests", len(self._jobs))
                    for rid in list(self._jobs):
                        engine.abort(rid)
                    self._fail_all(f"engine step failed: {type(e).__name__}: {e}", 500)
                    finished = []
                self.last_step = time.monotonic()
                self._publish(finished)

    def _add(self, job: Job) -> None:
        try:
            self.engine.add_request(job.prompt_token_ids, job.params, request_id=job.request_id,
                                    prompt=job.prompt, prompt_index=job.prompt_index, stream=job.stream)
        except ValueError as e:  # validated by the handler already; what it cannot see: a rollout id in flight
            job.emit(("error", job.request_id, str(e), 400))
            return
        except Exception as e:
            job.emit(("error", job.request_id, f"{type(e).__name__}: {e}", 500))
            return
        self._jobs[job.request_id] = job

    def end_early(self, rid: str, every: bool) -> int:
        """(engine thread) End the matching requests now with what they generated, finish_reason "abort"
        (``LLMEngine.abort(keep_output=True)``); their callers get the partial outputs. Returns how many."""
        ended = [self.engine.abort(request_id, keep_output=True) for request_id, job in list(self._jobs.items())
                 if every or rid in (request_id, job.params.rollout_id)]
        self._publish([out for out in ended if out is not None])
        return len(ended)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if not out.finished:  # a streaming request's step delta
                job = self._jobs.get(out.request_id)
                if job is not None:
                    for c in out.outputs:
                        job.emit(("delta", out.request_id, c.index, c.token_ids, c.logprobs, c.top_logprobs))
                continue
            job = self._jobs.pop(out.request_id, None)
            if job is not None:
                job.emit(("done", out.request_id, out))

    def _fail_all(self, message: str, status: int = 503) -> None:
        for job in self._jobs.values():
            job.emit(("error", job.request_id, message, status))
        self._jobs.clear()

    def _shutdown(self, taken: list) -> None:
        for rid in list(self._jobs):
            self.engine.abort(rid)
        self._fail_all("the server is shutting down")
        self._reject_queued(taken, "the server is shutting down")

    def _reject_queued(self, taken: list, message: str, status: int = 503) -> None:
        """Answer every command not carried out (already taken from the inbox, or still in it)."""
        while True:
            if taken:
                kind, arg = taken.pop(0)
            else:
                try:
                    kind, arg = self._inbox.get_nowait()
                except queue.Empty:
                    return
            if kind == "add":
                arg.emit(("error", arg.request_id, message, status))
            elif kind == "call":
                arg[1](None, message)
