"""Background writer: the engine hands routing arrays over and never waits on store I/O.

One daemon thread drains a bounded FIFO queue into ``store.put``. When the queue is full
``submit`` blocks (backpressure): a slow store slows the producer down instead of dropping
routing or growing memory without bound. Every write gets a Future; a failed write sets its
exception, counts in ``errors`` and is logged on the ``routereplay.store`` logger, and the thread
keeps serving later writes.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

import numpy as np

from . import RoutingStore, validate_key

logger = logging.getLogger("routereplay.store")

_STOP = object()


class StoreWriter:
    """Asynchronous, ordered writes to ``store`` through one background thread.

    The array passed to :meth:`submit` is not copied: the caller must not mutate it until the
    returned future is done. ``close()`` does not close ``store`` (the caller owns it).
    """

    def __init__(self, store: RoutingStore, max_queue: int = 256):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.store = store
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._submit_lock = threading.Lock()  # orders submits against close()
        self._pending = 0  # submitted and not finished, including submits blocked on a full queue
        self._blocked = 0  # submits waiting for room in the queue
        self._written = 0
        self._errors = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="routereplay-store-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, array: np.ndarray) -> Future[None]:
        """Queue ``store.put(key, array)``; blocks while the queue is full. Invalid keys raise here."""
        validate_key(key)
        future: Future[None] = Future()
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("StoreWriter is closed")
            with self._lock:
                self._pending += 1
                self._blocked += 1
            try:
                self._queue.put((key, array, future))
            finally:
                with self._lock:
                    self._blocked -= 1
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            key, array, future = item  # type: ignore[misc]
            try:
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    self.store.put(key, array)
                except Exception as exc:
                    with self._lock:
                        self._errors += 1
                    logger.error("routing store write failed for key %r: %r", key, exc, exc_info=exc)
                    future.set_exception(exc)
                else:
                    with self._lock:
                        self._written += 1
                    future.set_result(None)
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted write is done (including blocked submits); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish all queued writes, then stop the thread. Idempotent; later submits raise."""
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        """Writes accepted and not finished yet (queued plus the one in flight; not blocked submits)."""
        with self._lock:
            return self._pending - self._blocked

    @property
    def written(self) -> int:
        """Writes that succeeded."""
        with self._lock:
            return self._written

    @property
    def errors(self) -> int:
        """Writes that failed (each one's future holds the exception)."""
        with self._lock:
            return self._errors

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
