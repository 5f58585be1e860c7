"""Routing store: both backends, atomic local writes, key escaping, background writer, outages."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import redis

import routereplay.store as store_mod
from routereplay.store import LocalStore, RedisStore, RoutingStore, StoreQueueFull, StoreWriter
from tests.helpers import count_round_trips

# ---------------------------------------------------------------- helpers


def routing(t: int, layers: int = 3, k: int = 2, dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    hi = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, hi + 1, size=(t, layers, k)).astype(dtype)


class MemoryStore(RoutingStore):
    """In-memory store for writer tests (no I/O, so only the writer's logic is under test)."""

    def __init__(self) -> None:
        self.data: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()

    def put(self, key: str, array: np.ndarray) -> None:
        with self.lock:
            self.data[key] = array

    def get(self, key: str) -> np.ndarray:
        with self.lock:
            if key not in self.data:
                raise KeyError(key)
            return self.data[key]

    def delete(self, key: str) -> bool:
        with self.lock:
            return self.data.pop(key, None) is not None

    def keys(self, prefix: str = "") -> list[str]:
        with self.lock:
            return sorted(k for k in self.data if k.startswith(prefix))


class GatedStore(MemoryStore):
    """put() announces itself on ``entered`` and then waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, key: str, array: np.ndarray) -> None:
        self.entered.set()
        assert self.release.wait(10), "test never released the store"
        super().put(key, array)


class FailingStore(MemoryStore):
    def put(self, key: str, array: np.ndarray) -> None:
        if key == "bad":
            raise OSError("disk full (simulated)")
        super().put(key, array)


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RoutingStore:
    if request.param == "local":
        s: RoutingStore = LocalStore(tmp_path / "routing")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=f"test-{uuid.uuid4().hex}:")
    yield s
    s.clear()
    s.close()


# ---------------------------------------------------------------- both backends

SHAPES = [(0, 4, 2), (1, 1, 1), (17, 3, 8), (5, 48, 8)]


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(store: RoutingStore, dtype: str, shape: tuple[int, int, int]) -> None:
    arr = routing(*shape, dtype=dtype, seed=sum(shape))
    store.put("rollout-1/0", arr)
    got = store.get("rollout-1/0")
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    np.testing.assert_array_equal(got, arr)


def test_overwrite_and_missing(store: RoutingStore) -> None:
    store.put("r", routing(3, seed=1))
    store.put("r", routing(4, seed=2))
    np.testing.assert_array_equal(store.get("r"), routing(4, seed=2))
    with pytest.raises(KeyError, match="nope"):
        store.get("nope")
    assert "r" in store and "nope" not in store and "" not in store


def test_get_many_keeps_order(store: RoutingStore) -> None:
    arrays = {f"r{i}/{j}": routing(i + 1, seed=10 * i + j) for i in range(4) for j in range(2)}
    for k, a in arrays.items():
        store.put(k, a)
    order = ["r3/1", "r0/0", "r2/1", "r0/0", "r1/0"]
    for k, got in zip(order, store.get_many(order), strict=True):
        np.testing.assert_array_equal(got, arrays[k])
    assert store.get_many([]) == []
    with pytest.raises(KeyError, match="missing-one"):
        store.get_many(["r0/0", "missing-one"])


def test_keys_prefix_delete_clear(store: RoutingStore) -> None:
    for k in ["r1", "r1/1", "r1/0", "r10", "r2/0"]:
        store.put(k, routing(2))
    assert store.keys() == ["r1", "r1/0", "r1/1", "r10", "r2/0"]
    assert store.keys("r1/") == ["r1/0", "r1/1"]
    assert store.keys("r1") == ["r1", "r1/0", "r1/1", "r10"]
    assert store.keys("zzz") == []
    assert len(store) == 5
    assert store.delete("r1/0") is True
    assert store.delete("r1/0") is False
    assert "r1/0" not in store and store.keys("r1/") == ["r1/1"]
    store.clear()
    assert store.keys() == [] and len(store) == 0


@pytest.mark.parametrize("bad", ["", "a\x00b"])
def test_invalid_keys_rejected(store: RoutingStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.put(bad, routing(1))


# ---------------------------------------------------------------- open()


def test_open_urls(tmp_path: Path, redis_url: str) -> None:
    a = store_mod.open(str(tmp_path / "a"))
    b = store_mod.open(f"file://{tmp_path / 'b'}")
    c = store_mod.open(tmp_path / "c")
    assert [type(s) for s in (a, b, c)] == [LocalStore] * 3
    assert b.root == tmp_path / "b"
    r = store_mod.open(redis_url + "?prefix=run7:&ttl=60")
    assert isinstance(r, RedisStore) and r.prefix == "run7:" and r.ttl == 60
    assert store_mod.open(redis_url).prefix == "routereplay:"
    with pytest.raises(ValueError, match="s3"):
        store_mod.open("s3://bucket/routing")
    with pytest.raises(ValueError, match="ttl"):
        store_mod.open(redis_url + "?ttl=soon")


# ---------------------------------------------------------------- redis specifics


def test_redis_ttl(redis_url: str) -> None:
    prefix = f"ttl-{uuid.uuid4().hex}:"
    with RedisStore(redis_url, prefix=prefix, ttl=100) as s, RedisStore(redis_url, prefix=prefix) as forever:
        s.put("k", routing(2))
        forever.put("k2", routing(2))
        assert 0 < s.client.ttl(prefix + "k") <= 100
        assert s.client.ttl(prefix + "k2") == -1  # no expiry without ttl
        s.clear()


def test_redis_namespace_isolation(redis_url: str) -> None:
    tag = uuid.uuid4().hex
    # "p*" would glob-match "pq" if the namespace were not escaped in SCAN.
    a, b, c = (RedisStore(redis_url, prefix=f"{tag}:{p}:") for p in ("p*", "pq", "p?"))
    try:
        a.put("k", routing(1, seed=1))
        b.put("k", routing(2, seed=2))
        b.put("only-b", routing(1))
        c.put("k", routing(3, seed=3))
        assert a.keys() == ["k"] and c.keys() == ["k"] and b.keys() == ["k", "only-b"]
        assert a.get("k").shape[0] == 1 and b.get("k").shape[0] == 2
        a.clear()
        assert a.keys() == [] and b.keys() == ["k", "only-b"] and c.keys() == ["k"]
    finally:
        for s in (a, b, c):
            s.clear()
            s.close()


def test_redis_get_many_is_one_round_trip(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = RedisStore(redis_url, prefix=f"rt-{uuid.uuid4().hex}:")
    for i in range(5):
        s.put(str(i), routing(i))
    executes = count_round_trips(s, monkeypatch)
    monkeypatch.setattr(s.client, "get", lambda *a: pytest.fail("get_many must not GET key by key"))
    assert [a.shape[0] for a in s.get_many(["4", "0", "2"])] == [4, 0, 2]
    assert executes == [1]
    s.clear()


def test_redis_outage_is_surfaced(redis_server_factory) -> None:
    server = redis_server_factory()
    s = RedisStore(server.url)
    s.put("before", routing(2))
    server.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        s.put("during", routing(2))
    with StoreWriter(s) as w:
        fut = w.submit("during", routing(2))
        assert isinstance(fut.exception(timeout=30), redis.exceptions.ConnectionError)
        assert w.errors == 1 and w.written == 0


# ---------------------------------------------------------------- local: atomicity


def _all_files(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def test_local_file_is_plain_npy_and_mmap_loadable(tmp_path: Path) -> None:
    s = LocalStore(tmp_path, mmap=True)
    arr = routing(9, 4, 2, dtype="uint16")
    s.put("run/3", arr)
    on_disk = np.load(s.path("run/3"), mmap_mode="r")
    assert isinstance(on_disk, np.memmap)
    np.testing.assert_array_equal(on_disk, arr)
    assert isinstance(s.get("run/3"), np.memmap)
    assert s.path("run/3").parent == tmp_path
    assert _all_files(tmp_path) == [s.path("run/3").name]


def test_local_temp_files_never_listed(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    (tmp_path / ".tmp-leftover").write_bytes(b"\x93NUMPY partial")
    (tmp_path / "notes.txt").write_text("not routing")
    s.put("k", routing(2))
    assert s.keys() == ["k"] and len(s) == 1


def test_local_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = LocalStore(tmp_path)
    old = routing(3, seed=1)
    s.put("existing", old)
    before = _all_files(tmp_path)

    def crashing_save(file, arr, *args, **kwargs):
        file.write(b"\x93NUMPY\x01\x00 half a header")
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(np, "save", crashing_save)
    with pytest.raises(RuntimeError, match="mid-write"):
        s.put("new", routing(5))
    with pytest.raises(RuntimeError, match="mid-write"):
        s.put("existing", routing(5))
    monkeypatch.undo()
    assert s.keys() == ["existing"]
    assert _all_files(tmp_path) == before  # no half file, no temp file left
    np.testing.assert_array_equal(s.get("existing"), old)


def test_local_reader_never_sees_half_a_file(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    versions = [np.full((2000, 4, 8), v, dtype=np.uint8) for v in range(4)]
    s.put("hot", versions[0])
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                got = s.get("hot")
            except Exception as exc:  # a torn file shows up as a load error
                bad.append(repr(exc))
                return
            if got.shape != (2000, 4, 8) or len(np.unique(got)) != 1:
                bad.append(f"torn content {np.unique(got)}")
                return

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        s.put("hot", versions[i % 4])
    stop.set()
    t.join(10)
    assert bad == []


# ---------------------------------------------------------------- local: key escaping

NASTY_KEYS = [
    "..", ".", "...", "../../etc/passwd", "/abs", "/", "a/b/c", "a/../../b", "\\", "..\\..\\win",
    "C:\\x", ".hidden", "%2F", "a%2Fb", "a/b", "~tilde", " space ", "*?[]", "ünïcødé/键/🙂",
    "x" * 300, "é" * 300, "x" * 299 + "y", "r" * 120 + "/" + "z" * 200,
]


def test_local_key_escaping_stays_inside_and_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root)
    for i, key in enumerate(NASTY_KEYS):
        s.put(key, routing(i, seed=i))
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for name in dirnames + filenames:
            path = os.path.realpath(os.path.join(dirpath, name))
            if path != real_root:
                assert os.path.dirname(path) == real_root, f"{path} escaped the store directory"
            assert len(name.encode()) <= 255
    assert s.keys() == sorted(NASTY_KEYS)
    for i, key in enumerate(NASTY_KEYS):
        assert s.get(key).shape[0] == i, key
        assert os.path.dirname(os.path.realpath(s.path(key))) == real_root
    assert not any(n.startswith(".") for n in os.listdir(root))
    for key in NASTY_KEYS:
        assert s.delete(key) is True
    assert os.listdir(root) == []  # long keys' side files are removed too


@pytest.mark.parametrize("bad", ["", "nul\x00byte", "\x00"])
def test_local_rejects_empty_and_nul(tmp_path: Path, bad: str) -> None:
    s = LocalStore(tmp_path)
    with pytest.raises(ValueError):
        s.put(bad, routing(1))
    with pytest.raises(ValueError):
        s.path(bad)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- background writer


def test_writer_many_threads_all_land(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    futures: list[Future[None]] = []
    lock = threading.Lock()

    def producer(p: int) -> None:
        for i in range(40):
            while True:
                try:
                    f = w.submit(f"p{p}/{i}", routing(i % 5, seed=p * 100 + i))
                    break
                except StoreQueueFull:  # a full queue refuses at once; this producer waits and retries
                    w.flush(timeout=1)
            with lock:
                futures.append(f)

    with StoreWriter(s, max_queue=8) as w:
        threads = [threading.Thread(target=producer, args=(p,)) for p in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert w.flush(timeout=30)
        assert w.written == 240 and w.errors == w.rejected and w.queue_depth == 0
    assert all(f.done() and f.result() is None for f in futures)
    assert len(s.keys()) == 240
    np.testing.assert_array_equal(s.get("p5/39"), routing(39 % 5, seed=539))


def test_writer_keeps_submission_order_per_key() -> None:
    s = MemoryStore()
    with StoreWriter(s) as w:
        for v in range(50):
            w.submit("same", np.full((1, 1, 1), v, np.uint8))
    assert int(s.get("same")[0, 0, 0]) == 49


def test_writer_full_queue_rejects_at_once() -> None:
    s = GatedStore()
    w = StoreWriter(s, max_queue=2)
    try:
        first = w.submit("k0", routing(1))
        assert s.entered.wait(5)  # the thread holds k0; the queue is empty again
        rest = [w.submit("k1", routing(1)), w.submit("k2", routing(1))]  # fills the queue
        with pytest.raises(StoreQueueFull, match=r"'k3'.*") as info:
            w.submit("k3", routing(1))
        assert info.value.key == "k3" and info.value.max_queue == 2 and "(2 writes waiting" in str(info.value)
        assert w.queue_depth == 3 and w.rejected == 1 and w.errors == 1
        assert w.flush(timeout=0.05) is False
        s.release.set()
        assert w.flush(timeout=10)
        for f in [first, *rest]:
            assert f.result(timeout=1) is None
        assert s.keys() == ["k0", "k1", "k2"] and w.written == 3 and w.errors == 1
        assert w.submit("k3", routing(1)).result(timeout=10) is None  # room again
    finally:
        s.release.set()
        w.close()


def test_writer_error_is_surfaced_and_thread_survives(caplog: pytest.LogCaptureFixture) -> None:
    s = FailingStore()
    caplog.set_level(logging.ERROR, logger="routereplay.store")
    with StoreWriter(s) as w:
        good = w.submit("good", routing(1))
        bad = w.submit("bad", routing(1))
        later = w.submit("later", routing(1))
        assert w.flush(timeout=10)
        assert isinstance(bad.exception(), OSError)
        assert good.result() is None and later.result() is None
        assert w.errors == 1 and w.written == 2
    assert s.keys() == ["good", "later"]
    records = [r for r in caplog.records if r.name == "routereplay.store" and r.levelno == logging.ERROR]
    assert len(records) == 1 and "'bad'" in records[0].getMessage() and records[0].exc_info


def test_writer_close_flushes_and_is_idempotent() -> None:
    s = GatedStore()
    w = StoreWriter(s, max_queue=10)
    futures = [w.submit(f"k{i}", routing(1)) for i in range(5)]
    assert s.entered.wait(5)
    closer = threading.Thread(target=w.close)
    closer.start()  # close() starts while 4 writes are still queued
    s.release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert all(f.done() and f.exception() is None for f in futures)
    assert s.keys() == [f"k{i}" for i in range(5)] and w.queue_depth == 0
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.submit("late", routing(1))


def test_writer_rejects_bad_key_in_caller() -> None:
    with StoreWriter(MemoryStore()) as w, pytest.raises(ValueError):
        w.submit("", routing(1))
