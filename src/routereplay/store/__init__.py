"""Routing store: read and write per-request routing arrays by rollout key.

The rollout side writes ``[n_tokens - 1, L_moe, K]`` arrays (see DESIGN.md) under the request's
rollout id (``{rollout_id}/{i}`` for the i-th of n samples); the trainer reads them back, possibly
on another machine. Every backend stores the plain ``.npy`` bytes of the array, so a value is
readable with nothing but numpy.

``open(url)`` picks the backend:

* ``"/path"``, ``"relative/path"`` or ``"file:///path"`` -> :class:`LocalStore` (one ``.npy`` per key)
* ``"redis://host:port/db?prefix=routereplay:&ttl=3600"`` (or ``rediss://``) -> :class:`RedisStore`
  (bounded socket timeouts by default: ``&socket_timeout=10&socket_connect_timeout=2`` to change them)

``put_many`` writes a batch (Redis: one round trip) and raises :class:`StoreBatchError`, which holds
each item's error, when any item failed. :class:`StoreWriter` writes in the background and never
blocks its caller: a full queue raises :class:`StoreQueueFull` at once.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, urlsplit

import numpy as np

__all__ = [
    "LocalStore",
    "RedisStore",
    "RoutingStore",
    "StoreBatchError",
    "StoreQueueFull",
    "StoreWriter",
    "open",
    "validate_key",
]


def validate_key(key: str) -> str:
    """Reject keys no backend can hold faithfully (non-str, empty, NUL); return the key unchanged."""
    if not isinstance(key, str):
        raise TypeError(f"routing key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("routing key must not be empty")
    if "\x00" in key:
        raise ValueError(f"routing key must not contain NUL: {key!r}")
    return key


def to_npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` serialisation every backend stores (no pickles, so loading is safe)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def from_npy_bytes(data: bytes) -> np.ndarray:
    """Inverse of :func:`to_npy_bytes`; refuses pickled (object) payloads."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class StoreBatchError(Exception):
    """Some writes of a ``put_many`` batch failed; ``errors[i]`` is item i's exception, or None if stored."""

    def __init__(self, keys: Sequence[str], errors: Sequence[Exception | None]):
        self.keys = list(keys)
        self.errors = list(errors)
        failed = [(k, e) for k, e in zip(self.keys, self.errors, strict=True) if e is not None]
        if not failed:
            raise ValueError("StoreBatchError needs at least one failed write")
        key, first = failed[0]
        super().__init__(f"{len(failed)} of {len(self.keys)} routing writes failed; "
                         f"first: key {key!r}: {type(first).__name__}: {first}")

    @classmethod
    def raise_if_any(cls, keys: Sequence[str], errors: Sequence[Exception | None]) -> None:
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise cls(keys, errors) from first


class RoutingStore(ABC):
    """Key -> routing array map shared by all backends.

    Keys are non-empty str without NUL. Implementations are safe to use from several threads.
    """

    @abstractmethod
    def put(self, key: str, array: np.ndarray) -> None:
        """Store ``array`` under ``key``, replacing any previous value atomically."""

    @abstractmethod
    def get(self, key: str) -> np.ndarray:
        """Return the array under ``key``; KeyError naming the key if absent."""

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store every ``(key, array)`` in order (a later item of a key wins over an earlier one).

        A failed item does not stop the others; if any failed, :class:`StoreBatchError` is raised
        with each item's error. This default puts item by item; a backend overrides it to write the
        batch in one round trip (then a timeout of that round trip is every item's error).
        """
        keys: list[str] = []
        errors: list[Exception | None] = []
        for key, array in items:
            keys.append(key)
            try:
                self.put(key, array)
            except Exception as exc:  # collected and raised below, with the other items' errors
                errors.append(exc)
            else:
                errors.append(None)
        StoreBatchError.raise_if_any(keys, errors)

    def get_many(self, keys: Iterable[str]) -> list[np.ndarray]:
        """Arrays for ``keys`` in the same order; KeyError naming the first absent key."""
        return [self.get(k) for k in keys]

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it existed (deleting an absent key is not an error)."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """All stored keys starting with ``prefix``, sorted."""

    def clear(self) -> None:
        """Delete every key of this store (only this store's namespace)."""
        for key in self.keys():
            self.delete(key)

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections or handles; the store must not be used afterwards."""

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            self.get(key)
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self) -> RoutingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(url: str | os.PathLike[str], create: bool = True) -> RoutingStore:
    """Open the store named by ``url`` (a directory path, ``file://`` URL or ``redis(s)://`` URL).
    ``create=False``: a local directory that does not exist is a FileNotFoundError (readers)."""
    if isinstance(url, os.PathLike):
        return LocalStore(os.fspath(url), create=create)
    if not isinstance(url, str) or not url:
        raise ValueError(f"routing store URL must be a non-empty str, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "":
        return LocalStore(os.path.expanduser(url), create=create)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// store URL must be local, got host {parts.netloc!r} in {url!r}")
        if not parts.path:
            raise ValueError(f"file:// store URL has no path: {url!r}")
        return LocalStore(unquote(parts.path), create=create)
    if scheme in ("redis", "rediss"):
        from .redis_store import RedisStore  # redis-py is imported only when a Redis store is used

        return RedisStore(url)
    raise ValueError(f"unknown routing store scheme {scheme!r} in {url!r} (use a path, file://, redis://)")


# Backends import RoutingStore from this module, so they are imported after it is defined.
from .local import LocalStore  # noqa: E402
from .writer import StoreQueueFull, StoreWriter  # noqa: E402


def __getattr__(name: str):
    if name == "RedisStore":
        from .redis_store import RedisStore

        return RedisStore
    raise AttributeError(name)
