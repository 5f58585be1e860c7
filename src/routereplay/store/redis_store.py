"""Redis backend: for rollout and training on different machines.

Each key is one Redis string holding the array's ``.npy`` bytes, under ``prefix + key`` so that
several runs (or other applications) can share a database; ``clear`` only touches the namespace.
Connection errors are raised to the caller (``redis.exceptions.ConnectionError``), never swallowed.

Timeouts. A frozen or unreachable server must not hang a caller, so every socket operation is
bounded: connecting by ``socket_connect_timeout`` and every read or write (the handshake of a new
connection included) by ``socket_timeout``, both :data:`DEFAULT_SOCKET_TIMEOUT` seconds unless the
URL says otherwise, e.g. ``redis://host:6379/0?socket_timeout=10&socket_connect_timeout=2``. An
operation past its timeout raises ``redis.exceptions.TimeoutError``. A timed-out write may still
land if the server was only slow (it may have read the command before stalling). A ``client``
passed in keeps its own settings.

``put_many`` sends the whole batch in one pipelined round trip, so a frozen server fails the batch
after one timeout instead of one timeout per key.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import redis

from . import RoutingStore, StoreBatchError, from_npy_bytes, to_npy_bytes, validate_key

DEFAULT_PREFIX = "routereplay:"
# Older redis-py releases wait forever by default (None), so it is set for every version; the URL's
# socket_timeout / socket_connect_timeout win over it.
DEFAULT_SOCKET_TIMEOUT = 5.0
_GLOB_SPECIAL = "\\*?[]"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _split_url(url: str) -> tuple[str, str | None, int | None]:
    """Take our own ``prefix`` and ``ttl`` query parameters out of a redis URL."""
    parts = urlsplit(url)
    prefix: str | None = None
    ttl: int | None = None
    rest = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "prefix":
            prefix = value
        elif name == "ttl":
            try:
                ttl = int(value)
            except ValueError:
                raise ValueError(f"ttl must be an integer number of seconds, got {value!r}") from None
        else:
            rest.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix, ttl


class RedisStore(RoutingStore):
    """Routing store in Redis: ``RedisStore("redis://host:6379/0?prefix=run1:&ttl=86400")``.

    ``prefix`` / ``ttl`` keyword arguments override the URL's. ``ttl`` (seconds, > 0) makes every
    put expire; None keeps values until deleted. Other query parameters go to redis-py, e.g.
    ``socket_timeout`` / ``socket_connect_timeout`` (seconds, default :data:`DEFAULT_SOCKET_TIMEOUT`).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str | None = None,
        ttl: int | None = None,
        client: redis.Redis | None = None,
    ):
        conn_url, url_prefix, url_ttl = _split_url(url)
        if prefix is None:
            prefix = url_prefix if url_prefix is not None else DEFAULT_PREFIX
        self.prefix = prefix
        self.ttl = ttl if ttl is not None else url_ttl
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {self.ttl}")
        # A client passed in stays the caller's (not closed by close()); it must not decode responses.
        self._owns_client = client is None
        self.client = client if client is not None else redis.Redis.from_url(
            conn_url, socket_timeout=DEFAULT_SOCKET_TIMEOUT, socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT
        )
        self._url = url

    def __repr__(self) -> str:
        return f"RedisStore({self._url!r}, prefix={self.prefix!r}, ttl={self.ttl})"

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _value(self, key: str, array: np.ndarray) -> bytes:
        arr = np.asarray(array)
        if arr.dtype.hasobject:
            raise ValueError(f"cannot store an object array under {key!r}")
        return to_npy_bytes(arr)

    def put(self, key: str, array: np.ndarray) -> None:
        self.client.set(self._name(key), self._value(key, array), ex=self.ttl)

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """One pipelined round trip (no transaction: each SET succeeds or fails on its own)."""
        keys: list[str] = []
        errors: list[Exception | None] = []
        sent: list[int] = []  # indexes of the items in the pipeline
        pipe = self.client.pipeline(transaction=False)
        for i, (key, array) in enumerate(items):
            keys.append(key)
            try:
                pipe.set(self._name(key), self._value(key, array), ex=self.ttl)
            except (TypeError, ValueError) as exc:  # this item only: a bad key or an object array
                errors.append(exc)
                continue
            errors.append(None)
            sent.append(i)
        if sent:
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.exceptions.RedisError as exc:  # the round trip failed: so did every write in it
                for i in sent:
                    errors[i] = exc
            else:
                for i, reply in zip(sent, replies, strict=True):
                    if isinstance(reply, Exception):  # e.g. OOM: a command error, for this write only
                        errors[i] = reply
        StoreBatchError.raise_if_any(keys, errors)

    def get(self, key: str) -> np.ndarray:
        data = self.client.get(self._name(key))
        if data is None:
            raise KeyError(f"routing key not found: {key!r} (redis prefix {self.prefix!r})")
        return from_npy_bytes(data)

    def get_many(self, keys: Iterable[str]) -> list[np.ndarray]:
        """One pipelined round trip (not MGET, so it also works across cluster slots)."""
        keys = list(keys)
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._name(key))
        values = pipe.execute()
        missing = [k for k, v in zip(keys, values, strict=True) if v is None]
        if missing:
            raise KeyError(f"routing keys not found: {missing!r} (redis prefix {self.prefix!r})")
        return [from_npy_bytes(v) for v in values]

    def delete(self, key: str) -> bool:
        return bool(self.client.delete(self._name(key)))

    def _scan(self, prefix: str = "") -> Iterable[bytes]:
        return self.client.scan_iter(match=_glob_escape(self.prefix + prefix) + "*", count=1000)

    def keys(self, prefix: str = "") -> list[str]:
        start = len(self.prefix.encode("utf-8"))
        return sorted(name[start:].decode("utf-8") for name in self._scan(prefix))

    def clear(self) -> None:
        batch: list[bytes] = []
        for name in self._scan():
            batch.append(name)
            if len(batch) >= 1000:
                self.client.delete(*batch)
                batch.clear()
        if batch:
            self.client.delete(*batch)

    def __contains__(self, key: object) -> bool:
        try:
            return isinstance(key, str) and bool(self.client.exists(self._name(key)))
        except ValueError:
            return False

    def __len__(self) -> int:
        return sum(1 for _ in self._scan())

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
