"""Weight-sync groups (SGLang's ``/init_weights_update_group`` protocol) fail fast instead of hanging:
real gloo on CPU, real threads and processes, a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from routereplay.tiny import make_tiny_checkpoint
from routereplay.weight_sync import WeightGroupError, WeightSender, make_group
from tests.test_server import Server, _free_port

SLACK_S = 2.0  # rank 0's TCPStore gives up about a second past its timeout


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_make_group_forms_and_broadcasts_within_its_timeout() -> None:
    """Both ranks of a gloo group (rank 0 in a thread) with a short timeout: it forms and broadcasts."""
    port, got = _free_port(), {}

    def rank0() -> None:
        group = make_group("127.0.0.1", port, 0, 2, "g", "gloo", timeout_s=20)
        group.broadcast(torch.arange(4.0), 0).wait()
        got["rank0"] = group

    thread = threading.Thread(target=rank0)
    thread.start()
    group = make_group("127.0.0.1", port, 1, 2, "g", "gloo", timeout_s=20)
    buf = torch.zeros(4)
    group.broadcast(buf, 0).wait()
    thread.join(30)
    assert buf.tolist() == [0, 1, 2, 3]
    group.shutdown()
    got["rank0"].shutdown()


@pytest.mark.parametrize("rank", [0, 1])
def test_make_group_without_a_peer_fails_within_its_timeout(rank: int) -> None:
    """Rank 1 towards an address where nobody hosts the rendezvous, or rank 0 that nobody joins: a
    WeightGroupError naming the group and its rendezvous after timeout_s, not torch's 600 s default;
    rank 0's port is free again afterwards."""
    port, timeout_s = _free_port(), 2.0
    start = time.monotonic()
    with pytest.raises(WeightGroupError, match=rf"'lonely' \(rank {rank} of 2, rendezvous 127.0.0.1:{port}, "
                                               r"timeout 2 s\) did not form"):
        make_group("127.0.0.1", port, rank, 2, "lonely", "gloo", timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert timeout_s * 0.9 <= elapsed < timeout_s + SLACK_S, elapsed
    assert _port_is_free(port)


def test_bad_arguments_fail_before_any_rendezvous() -> None:
    port = _free_port()
    with pytest.raises(ValueError, match="backend must be"):
        make_group("127.0.0.1", port, 0, 2, "g", "mpi")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        make_group("127.0.0.1", port, 0, 2, "g", "gloo", timeout_s=0)
    assert _port_is_free(port)


def test_sender_without_a_server_fails_at_once() -> None:
    """Nobody at the URL: the POST fails, the sender raises at once instead of waiting for a rank that
    will never join, and the rendezvous it hosted is gone."""
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(WeightGroupError, match="/init_weights_update_group: ConnectError"):
        WeightSender(f"http://127.0.0.1:{_free_port()}", master_port=port, timeout_s=30)
    assert time.monotonic() - start < 5
    assert _port_is_free(port)


SERVER_GROUP_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("weight_sync")
    srv = Server(make_tiny_checkpoint(str(base / "qwen3_moe"), "qwen3_moe"), base / "server.log",
                 "--weight-group-timeout", str(SERVER_GROUP_TIMEOUT_S))
    try:
        yield srv
    finally:
        srv.stop()


_DYING_SENDER = """
import sys, time
from routereplay.weight_sync import WeightSender
WeightSender(sys.argv[1], master_port=int(sys.argv[2]), timeout_s=30)
print("joined", flush=True)
time.sleep(600)
"""


def test_sender_refused_by_the_server_raises_at_once(server: Server, tmp_path: Path) -> None:
    """A trainer dies without close(): its group stays on the server, which then answers the next
    sender's /init_weights_update_group with 400 "group_name ... exists already". That sender raises
    the server's message within seconds (it used to wait 600 s in the rendezvous) and frees its port;
    once the stale group is destroyed a new sender joins and syncs."""
    dying = subprocess.Popen([sys.executable, "-c", _DYING_SENDER, server.url, str(_free_port())],
                             stdout=subprocess.PIPE, stderr=(tmp_path / "dying.log").open("wb"), text=True)
    try:
        assert dying.stdout.readline().strip() == "joined", (tmp_path / "dying.log").read_text()
    finally:
        dying.kill()
        dying.wait()
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(WeightGroupError, match="400 .*group_name 'routereplay_weights' exists already"):
        WeightSender(server.url, master_port=port, timeout_s=30)
    assert time.monotonic() - start < 5
    assert _port_is_free(port)

    r = server.post("/destroy_weights_update_group", {"group_name": "routereplay_weights"})
    assert r.status_code == 200, r.text
    with WeightSender(server.url, master_port=_free_port(), timeout_s=30) as sender:
        weight = torch.zeros(4)  # a name the server does not have: received, discarded, reported
        with pytest.raises(RuntimeError, match="nope"):
            sender.send([("model.layers.0.nope", weight)])
    assert server.post("/destroy_weights_update_group", {"group_name": "routereplay_weights"}).status_code == 400


def test_second_live_sender_on_the_same_group_is_refused(server: Server) -> None:
    """Two trainers picking the same group_name: the second is refused with the server's message while
    the first keeps working."""
    with WeightSender(server.url, master_port=_free_port(), group_name="shared", timeout_s=30) as first:
        port = _free_port()
        start = time.monotonic()
        with pytest.raises(WeightGroupError, match="group_name 'shared' exists already"):
            WeightSender(server.url, master_port=port, group_name="shared", timeout_s=30)
        assert time.monotonic() - start < 5
        assert _port_is_free(port)
        with pytest.raises(RuntimeError, match="nope"):
            first.send([("model.layers.0.nope", torch.zeros(2))])


def test_server_answers_400_when_the_trainer_never_hosts_the_group(server: Server) -> None:
    """The server's side of the same rule (``--weight-group-timeout``): /init_weights_update_group towards
    a rendezvous nobody hosts is a 400 after that many seconds, and the group name stays free."""
    port = _free_port()
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "never", "backend": "gloo"}
    start = time.monotonic()
    r = server.post("/init_weights_update_group", body)
    elapsed = time.monotonic() - start
    assert r.status_code == 400 and r.json()["error"]["param"] == "master_address", r.text
    assert "WeightGroupError" in r.text and "nobody hosts the rendezvous" in r.text, r.text
    assert SERVER_GROUP_TIMEOUT_S * 0.9 <= elapsed < SERVER_GROUP_TIMEOUT_S + SLACK_S, elapsed
    with WeightSender(server.url, master_port=_free_port(), group_name="never", timeout_s=30):
        pass
