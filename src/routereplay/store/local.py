"""Local directory backend: one ``.npy`` file per key.

Why this shape: a trainer on the same machine (or a shared filesystem) can ``np.load`` a rollout's
routing directly, memory-mapped, without any routereplay code.

Atomicity: each value is written to a hidden temporary file in the same directory, flushed, and
moved over the final name with ``os.replace``; a reader sees the old file or the new one, never a
half-written one. By default the file is flushed but not fsync'd (a process crash cannot expose a
partial file; only a power loss could lose the latest writes); pass ``fsync=True`` to also fsync the
file and the directory when the data must survive a machine crash.

File names: the key's UTF-8 bytes, with everything outside ``[A-Za-z0-9._-]`` percent-encoded
(``/`` -> ``%2F``) and a leading ``.`` encoded as ``%2E``; so a name never contains a path
separator, never starts with a dot (hidden temp files do), and decodes back to the key. Encoded
names longer than the filename limit are cut and suffixed with ``~`` + a SHA-256 digest of the key,
and the original key is kept beside the data in ``<name>.key``.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import unquote_to_bytes

import numpy as np

from . import RoutingStore, validate_key

_UNSAFE = re.compile(rb"[^A-Za-z0-9._-]")
_DATA_SUFFIX = ".npy"
_KEY_SUFFIX = ".key"
_TMP_PREFIX = ".tmp-"
# NAME_MAX is 255 bytes on common filesystems; stay well below it, suffixes included.
_MAX_STEM = 200
_HASHED_HEAD = 120
_HASH_MARK = "~"  # never produced by the percent-encoding, so it marks hashed names unambiguously


def encode_key(key: str) -> str:
    """File stem for ``key`` (without suffix); reversible for stems that do not contain ``~``."""
    validate_key(key)
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise ValueError(f"routing key is not valid unicode: {key!r}") from exc
    stem = _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if len(stem) > _MAX_STEM:
        digest = hashlib.sha256(raw).hexdigest()[:40]
        stem = stem[:_HASHED_HEAD] + _HASH_MARK + digest
    return stem


def _decode_stem(stem: str) -> str | None:
    """Key of a short (non-hashed) stem, or None if the name was not produced by encode_key."""
    try:
        key = unquote_to_bytes(stem).decode("utf-8")
        return key if encode_key(key) == stem else None
    except ValueError:
        return None


class LocalStore(RoutingStore):
    """Routing store in a local directory (created if missing, unless ``create=False``: then a missing
    directory is a FileNotFoundError, for readers).

    ``mmap=True`` makes ``get`` return read-only memory-mapped arrays instead of in-memory copies.
    """

    def __init__(self, directory: str | os.PathLike[str], *, mmap: bool = False, fsync: bool = False,
                 create: bool = True):
        self.root = Path(directory).expanduser().absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"no store directory {str(self.root)!r}")
        self._mmap = mmap
        self._fsync = fsync

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Where ``key``'s ``.npy`` file lives (whether or not it exists); always inside the root."""
        return self.root / (encode_key(key) + _DATA_SUFFIX)

    def _atomic_write(self, final: Path, write: Callable[[IO[bytes]], None]) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with tmp.open("xb") as f:
                write(f)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self._fsync:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put(self, key: str, array: np.ndarray) -> None:
        stem = encode_key(key)
        arr = np.asarray(array)
        if arr.dtype.hasobject:
            raise ValueError(f"cannot store an object array under {key!r}")
        if _HASH_MARK in stem:
            # The key file is written first, so a visible .npy always has its key beside it.
            key_path = self.root / (stem + _KEY_SUFFIX)
            if not key_path.exists():
                self._atomic_write(key_path, lambda f: f.write(key.encode("utf-8")))
        self._atomic_write(
            self.root / (stem + _DATA_SUFFIX), lambda f: np.save(f, arr, allow_pickle=False)
        )

    def get(self, key: str) -> np.ndarray:
        path = self.path(key)
        try:
            return np.load(path, mmap_mode="r" if self._mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise KeyError(f"routing key not found: {key!r} (in {self.root})") from None

    def delete(self, key: str) -> bool:
        stem = encode_key(key)
        try:
            (self.root / (stem + _DATA_SUFFIX)).unlink()
            existed = True
        except FileNotFoundError:
            existed = False
        if _HASH_MARK in stem:
            (self.root / (stem + _KEY_SUFFIX)).unlink(missing_ok=True)
        return existed

    def keys(self, prefix: str = "") -> list[str]:
        found = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not name.endswith(_DATA_SUFFIX):
                    continue  # temp files, key files, foreign files
                stem = name[: -len(_DATA_SUFFIX)]
                key = self._read_key(stem) if _HASH_MARK in stem else _decode_stem(stem)
                if key is not None and key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def _read_key(self, stem: str) -> str | None:
        try:
            key = (self.root / (stem + _KEY_SUFFIX)).read_bytes().decode("utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        try:
            return key if encode_key(key) == stem else None
        except ValueError:
            return None

    def __contains__(self, key: object) -> bool:
        try:
            return isinstance(key, str) and self.path(key).is_file()
        except ValueError:
            return False
