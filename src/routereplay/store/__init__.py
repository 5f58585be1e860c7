"""Routing store: read and write per-request routing arrays by rollout key.

The rollout side writes ``[n_tokens - 1, L_moe, K]`` arrays (see DESIGN.md) under the request's
rollout id (``{rollout_id}/{i}`` for the i-th of n samples); the trainer reads them back, possibly
on another machine. Every backend stores the plain ``.npy`` bytes of the array, so a value is
readable with nothing but numpy.

``open(url)`` picks the backend:

* ``"/path"``, ``"relative/path"`` or ``"file:///path"`` -> :class:`LocalStore` (one ``.npy`` per key)
* ``"redis://host:port/db?prefix=routereplay:&ttl=3600"`` (or ``rediss://``) -> :class:`RedisStore`
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import numpy as np

__all__ = [
    "LocalStore",
    "RedisStore",
    "RoutingStore",
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


def open(url: str | os.PathLike[str]) -> RoutingStore:
    """Open the store named by ``url`` (a directory path, ``file://`` URL or ``redis(s)://`` URL)."""
    if isinstance(url, os.PathLike):
        return LocalStore(os.fspath(url))
    if not isinstance(url, str) or not url:
        raise ValueError(f"routing store URL must be a non-empty str, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "":
        return LocalStore(os.path.expanduser(url))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// store URL must be local, got host {parts.netloc!r} in {url!r}")
        if not parts.path:
            raise ValueError(f"file:// store URL has no path: {url!r}")
        return LocalStore(unquote(parts.path))
    if scheme in ("redis", "rediss"):
        from .redis_store import RedisStore  # redis-py is imported only when a Redis store is used

        return RedisStore(url)
    raise ValueError(f"unknown routing store scheme {scheme!r} in {url!r} (use a path, file://, redis://)")


# Backends import RoutingStore from this module, so they are imported after it is defined.
from .local import LocalStore  # noqa: E402
from .writer import StoreWriter  # noqa: E402


def __getattr__(name: str):
    if name == "RedisStore":
        from .redis_store import RedisStore

        return RedisStore
    raise AttributeError(name)
