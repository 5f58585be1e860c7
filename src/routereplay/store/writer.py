"""Background writer: the engine hands routing arrays over and never waits on store I/O.

One daemon thread takes everything queued at once and writes it as one batch with
``store.put_many`` (Redis: one pipelined round trip). So when the store is down or frozen, the
queued writes fail together after one timeout of the store (see ``redis_store``), not one timeout
after another: a write waits for at most the batch in flight and then its own, about two timeouts.

``submit`` never blocks: when ``max_queue`` writes are already waiting (besides the batch being
written) it raises :class:`StoreQueueFull` at once, so a slow store cannot stall the engine
thread; that routing is not stored, and the caller reports the error. Memory is bounded: at most
``max_queue`` waiting arrays plus the batch in flight (at most ``max_queue`` more).

Every accepted write gets a Future; a failed write sets its exception, counts in ``errors`` and is
logged on the ``routereplay.store`` logger, and the thread keeps serving later writes. Writes are
made in submission order, so a later write of a key wins over an earlier one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future

import numpy as np

from . import RoutingStore, StoreBatchError, validate_key

logger = logging.getLogger("routereplay.store")


class StoreQueueFull(RuntimeError):
    """``StoreWriter.submit`` found the queue full (the store is slower than the writes, or down)."""

    def __init__(self, key: str, max_queue: int):
        self.key = key
        self.max_queue = max_queue
        super().__init__(f"routing store write queue is full ({max_queue} writes waiting; the store is slow "
                         f"or unreachable): write for key {key!r} rejected, its routing is not stored")


_Item = tuple[str, np.ndarray, Future]


class StoreWriter:
    """Asynchronous, ordered, batched writes to ``store`` through one background thread.

    The array passed to :meth:`submit` is not copied: the caller must not mutate it until the
    returned future is done. ``close()`` does not close ``store`` (the caller owns it).
    """

    def __init__(self, store: RoutingStore, max_queue: int = 256):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.store = store
        self.max_queue = max_queue
        self._queue: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread waits for writes or close
        self._idle = threading.Condition(self._lock)  # flush waits for nothing pending
        self._in_flight = 0  # writes of the batch being written
        self._written = 0
        self._errors = 0
        self._rejected = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="routereplay-store-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, array: np.ndarray) -> Future[None]:
        """Queue ``store.put(key, array)`` and return at once.

        Raises ValueError/TypeError for an invalid key, :class:`StoreQueueFull` when ``max_queue``
        writes are already waiting, RuntimeError once closed.
        """
        validate_key(key)
        future: Future[None] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("StoreWriter is closed")
            if len(self._queue) >= self.max_queue:
                self._errors += 1
                self._rejected += 1
                raise StoreQueueFull(key, self.max_queue)
            self._queue.append((key, array, future))
            self._work.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._lock:
                self._work.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and drained
                batch = list(self._queue)
                self._queue.clear()
                self._in_flight = len(batch)
            try:
                self._write(batch)
            finally:
                with self._lock:
                    self._in_flight = 0
                    if not self._queue:
                        self._idle.notify_all()

    def _write(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item[2].set_running_or_notify_cancel()]
        if not live:
            return
        try:
            self.store.put_many([(key, array) for key, array, _ in live])
            errors: list[Exception | None] = [None] * len(live)
        except StoreBatchError as exc:  # a backend's errors not matching the batch fail it whole
            errors = exc.errors if len(exc.errors) == len(live) else [exc] * len(live)
        except Exception as exc:  # a backend's own put_many failing as a whole: every write failed
            errors = [exc] * len(live)
        failed = sum(e is not None for e in errors)
        with self._lock:  # counted before the futures resolve, so a caller woken by one sees its count
            self._written += len(live) - failed
            self._errors += failed
        logged: set[int] = set()  # one traceback per distinct error: a timeout is shared by the batch
        for (key, _, future), exc in zip(live, errors, strict=True):
            if exc is None:
                future.set_result(None)
                continue
            logger.error("routing store write failed for key %r: %s: %s", key, type(exc).__name__, exc,
                         exc_info=exc if id(exc) not in logged else None)
            logged.add(id(exc))
            future.set_exception(exc)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted write is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued writes, then stop the thread; waits at most ``timeout`` seconds for it
        (the thread goes on with what is left). Idempotent; later submits raise."""
        with self._lock:
            self._closed = True
            self._work.notify()
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        """Writes accepted and not finished yet (queued plus the batch in flight)."""
        with self._lock:
            return len(self._queue) + self._in_flight

    @property
    def written(self) -> int:
        """Writes that succeeded."""
        with self._lock:
            return self._written

    @property
    def errors(self) -> int:
        """Writes not stored: failed ones (each one's future holds the exception) plus ``rejected``."""
        with self._lock:
            return self._errors

    @property
    def rejected(self) -> int:
        """Submits refused with :class:`StoreQueueFull` (no future: the caller got the exception)."""
        with self._lock:
            return self._rejected

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
