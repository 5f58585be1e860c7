"""A frozen Redis (redis-server under SIGSTOP: connections are accepted, nothing is answered) never
stalls generation: store calls fail within their socket timeout, the writer fails its whole queue in
about one timeout and refuses overflow at once, and the server keeps answering."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import redis

from routereplay.routing import decode
from routereplay.store import RedisStore, StoreBatchError, StoreQueueFull, StoreWriter
from routereplay.store.redis_store import DEFAULT_SOCKET_TIMEOUT
from routereplay.tiny import make_tiny_checkpoint
from tests.helpers import count_round_trips
from tests.test_server import Server, complete

if TYPE_CHECKING:
    from tests.conftest import RedisServer

TIMEOUT_S = 0.5  # the socket timeout the store tests put in the URL
SLACK_S = 0.5  # scheduling noise on a loaded 2-core machine


def routing(t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 8, size=(t, 2, 2)).astype(np.uint8)


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """The server is stopped (SIGSTOP) inside the block and always resumed after it."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def store_url(server: RedisServer, timeout: float = TIMEOUT_S) -> str:
    return f"{server.url}?socket_timeout={timeout}&prefix=outage-{uuid.uuid4().hex}:"


def test_timeouts_are_bounded_by_default_and_the_url_overrides_them(redis_url: str) -> None:
    with RedisStore(redis_url) as s:
        kw = s.client.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == kw["socket_connect_timeout"] == DEFAULT_SOCKET_TIMEOUT
    with RedisStore(redis_url + "?socket_timeout=10&socket_connect_timeout=2&prefix=p:") as s:
        kw = s.client.connection_pool.connection_kwargs
        assert (kw["socket_timeout"], kw["socket_connect_timeout"], s.prefix) == (10.0, 2.0, "p:")


def test_write_to_frozen_redis_fails_within_the_timeout(redis_server_factory) -> None:
    server = redis_server_factory()
    url = store_url(server)
    with RedisStore(url) as connected, RedisStore(url) as fresh:
        connected.put("warm", routing(2))  # holds an open connection when the server freezes
        with frozen(server):
            for s in (connected, fresh):  # a pooled connection, and a new one (its handshake times out)
                t0 = time.monotonic()
                with pytest.raises(redis.exceptions.TimeoutError):
                    s.put("during", routing(2))
                assert TIMEOUT_S * 0.9 <= time.monotonic() - t0 < TIMEOUT_S + SLACK_S
            t0 = time.monotonic()
            with pytest.raises(StoreBatchError) as info:  # 50 writes, one round trip: one timeout
                connected.put_many([(f"k{i}", routing(3, seed=i)) for i in range(50)])
            assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S
            assert isinstance(info.value.__cause__, redis.exceptions.TimeoutError)
            assert len(info.value.errors) == 50 and all(e is info.value.__cause__ for e in info.value.errors)
        connected.put("after", routing(4))  # resumed: the store works again
        np.testing.assert_array_equal(fresh.get("after"), routing(4))


def test_put_many_is_one_round_trip_with_per_item_errors(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with RedisStore(redis_url, prefix=f"many-{uuid.uuid4().hex}:") as s:
        executes = count_round_trips(s, monkeypatch)
        items = [("a", routing(1, 1)), ("bad", np.array([object()])), ("b", routing(2, 2)), ("a", routing(3, 3))]
        with pytest.raises(StoreBatchError, match=r"1 of 4 routing writes failed; first: key 'bad'") as info:
            s.put_many(items)
        assert executes == [1]
        assert [type(e).__name__ if e else None for e in info.value.errors] == [None, "ValueError", None, None]
        assert s.keys() == ["a", "b"]
        np.testing.assert_array_equal(s.get("a"), routing(3, 3))  # the later write of a key wins
        s.put_many([])
        assert executes == [1]  # nothing to send, no round trip
        s.clear()


def test_writer_over_frozen_redis_never_blocks_and_fails_in_two_timeouts(redis_server_factory) -> None:
    server = redis_server_factory()
    store = RedisStore(store_url(server))
    max_queue, n = 8, 40
    w = StoreWriter(store, max_queue=max_queue)
    try:
        store.put("warm", routing(1))
        accepted: list[Future[None]] = []
        refused: list[StoreQueueFull] = []
        with frozen(server):
            t0 = time.monotonic()
            for i in range(n):
                start = time.monotonic()
                try:
                    accepted.append(w.submit(f"r{i}", routing(5, seed=i)))
                except StoreQueueFull as exc:
                    refused.append(exc)
                assert time.monotonic() - start < 0.05, f"submit {i} blocked"
            # At most one batch in flight (<= max_queue) plus max_queue waiting: the rest is refused.
            # Refused only once max_queue wait behind the batch in flight (<= max_queue): written one by
            # one, the accepted writes would fail in >= max_queue timeouts.
            assert max_queue <= len(accepted) <= 2 * max_queue and len(refused) == n - len(accepted) == w.rejected
            assert "queue is full (8 writes waiting" in str(refused[0]) and repr(refused[0].key) in str(refused[0])
            for f in accepted:
                assert isinstance(f.exception(timeout=10), redis.exceptions.TimeoutError)
            elapsed = time.monotonic() - t0  # one batch in flight, then one with all the others
            assert elapsed < 2 * TIMEOUT_S + 2 * SLACK_S, f"{len(accepted)} writes took {elapsed:.2f}s to fail"
            assert w.errors == n and w.written == 0 and w.queue_depth == 0
        fut = w.submit("after", routing(6))
        assert fut.result(timeout=5) is None and w.written == 1
        np.testing.assert_array_equal(store.get("after"), routing(6))
    finally:
        w.close(timeout=5)
        store.close()


def test_writer_close_returns_within_its_timeout_while_frozen(redis_server_factory) -> None:
    server = redis_server_factory()
    store = RedisStore(store_url(server, timeout=5))  # a write outlives close's timeout
    w = StoreWriter(store, max_queue=2)
    try:
        with frozen(server):
            futures = [w.submit("k0", routing(1))]
            with pytest.raises(StoreQueueFull):
                for i in range(1, 10):
                    futures.append(w.submit(f"k{i}", routing(1)))
            t0 = time.monotonic()
            w.close(timeout=0.2)
            assert time.monotonic() - t0 < 0.2 + SLACK_S
            assert w.queue_depth == len(futures) >= 2  # none finished: in flight or waiting
            with pytest.raises(RuntimeError, match="closed"):
                w.submit("late", routing(1))
    finally:
        w.close(timeout=15)  # resumed: the writes in flight finish, the thread stops
        store.close()


# ---- the server ------------------------------------------------------------------------------------
def timed(fn):
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


def test_server_keeps_serving_while_redis_is_frozen(redis_server_factory, tmp_path: Path) -> None:
    redis_server = redis_server_factory()
    ckpt = make_tiny_checkpoint(str(tmp_path / "qwen3_moe"), "qwen3_moe")
    url = store_url(redis_server, timeout=1)
    rr = {"enable": True, "store": "redis", "redis_url": url, "store_queue_size": 2}
    server = Server(ckpt, tmp_path / "server.log", "--routing-replay", json.dumps(rr))
    try:
        c = server.client()

        def unstored():
            return complete(c, store_routing=False)

        unstored()  # warm-up
        _, baseline = timed(unstored)
        with RedisStore(url) as rs:
            ch = complete(c, rollout_id="before").choices[0]
            assert ch.routing_error is None
            np.testing.assert_array_equal(rs.get("before"), decode(ch.routed_experts))

            burst = 12  # > store_queue_size + the batch in flight
            with frozen(redis_server), ThreadPoolExecutor(burst) as pool:
                t0 = time.monotonic()
                replies = [pool.submit(complete, c, rollout_id=f"frozen{i}") for i in range(burst)]
                deadline = time.monotonic() + 10
                while server.metrics()["routereplay_store_queue_depth"] == 0:  # a write is stuck on Redis
                    assert time.monotonic() < deadline, "no write reached the frozen store"
                    time.sleep(0.02)
                health, health_s = timed(lambda: httpx.get(server.url + "/health_generate", timeout=10))
                assert health.status_code == 200 and health_s < 1.0, (health.text, health_s)
                _, unstored_s = timed(unstored)
                assert unstored_s < baseline + 1.0, (unstored_s, baseline)
                errors = [r.result(timeout=30).choices[0].routing_error for r in replies]
                burst_s = time.monotonic() - t0
            assert all(errors), errors  # every reply came back, each saying its routing was not stored
            assert any("StoreQueueFull" in e for e in errors) and any("TimeoutError" in e for e in errors)
            assert burst_s < 2 * 1 + 1.5, f"the burst took {burst_s:.2f}s to fail"
            assert server.metrics()["routereplay_store_errors_total"] >= burst

            ch = complete(c, rollout_id="resumed").choices[0]
            assert ch.routing_error is None
            np.testing.assert_array_equal(rs.get("resumed"), decode(ch.routed_experts))
    finally:
        server.stop_gracefully()
