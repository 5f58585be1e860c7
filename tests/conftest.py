"""Shared fixtures: real redis-server processes on loopback ports.

``redis_url`` is one server for the whole session (tests isolate themselves with unique key
prefixes). ``redis_server_factory`` starts private servers a test may stop (outage tests).
Without a redis-server binary the Redis tests are skipped, except under CI (env CI set), where a
missing binary fails them: CI must not pass by silently skipping the Redis backend.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

# Tiny models: one thread is several times faster than two fighting over 2 cores.
torch.set_num_threads(1)

_START_TIMEOUT_S = 10.0


def _redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found:
        return found
    ci = os.environ.get("CI", "").strip().lower()
    if ci not in ("", "0", "false", "no"):
        pytest.fail("redis-server is not installed, and CI is set: the Redis store tests must run in CI")
    pytest.skip("redis-server not found on PATH (install redis-server to run the Redis store tests)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server child process without persistence; ``stop()`` kills it."""

    def __init__(self, binary: str, workdir: Path):
        import redis

        workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = _free_port()
            self.log_path = workdir / f"redis-{self.port}.log"
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(
                    [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
            deadline = time.monotonic() + _START_TIMEOUT_S
            try:
                while time.monotonic() < deadline and self.proc.poll() is None:
                    try:
                        if client.ping():
                            return
                    except redis.exceptions.ConnectionError:
                        time.sleep(0.02)  # waiting for the server to come up
            finally:
                client.close()
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"redis-server did not start; last log:\n{last_error}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny qwen3_moe checkpoint (MoE on layers 1 and 3, 8 experts, top-2) the server tests serve."""
    from routereplay.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("server_ckpt") / "qwen3_moe"), "qwen3_moe")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a session-wide redis-server on a free loopback port (db 0)."""
    server = RedisServer(_redis_binary(), tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start private redis-servers (killable by the test); all are killed at teardown."""
    binary = _redis_binary()
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(binary, tmp_path / f"redis{len(servers)}")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
