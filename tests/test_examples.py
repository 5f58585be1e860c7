"""The examples in examples/ run as a user runs them (fresh working directory) and print what they promise."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart(tmp_path: Path) -> None:
    out = _run("quickstart.py", tmp_path)
    # 2 MoE layers of top-2 in the tiny checkpoint; rows = prompt + 16 generated - 1
    assert "routed_experts: (" in out and ", 2, 2) uint8" in out and "MoE layers [1, 3]" in out


def test_grpo_r3_trains_with_replay(tmp_path: Path) -> None:
    out = _run("grpo_r3.py", tmp_path)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(8))  # one line per step
    replay_kl, native_kl = (sum(float(r[i]) for r in rows) / len(rows) for i in (2, 3))
    assert replay_kl < native_kl / 2  # replaying the rollout's experts removes most of the mismatch
    assert all(float(r[4].rstrip("%")) > 0 for r in rows)  # the trainer's own routers would differ
    replayed = [r[5].split("/") for r in rows]  # the replay report: every MoE layer replayed, tokens too
    assert all(a == b and int(a) > 0 for a, b in replayed) and all(int(r[6]) > 0 for r in rows)
    assert (tmp_path / "grpo-r3-routing").is_dir()  # the routing went through the store


def test_server_loop_syncs_weights_each_step(tmp_path: Path) -> None:
    out = _run("server_loop.py", tmp_path)
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all("4 rollouts" in line and "synced 91 tensors" in line for line in steps)
    assert len(list((tmp_path / "server-loop-routing").glob("step*.npy"))) == 12  # 3 steps x 4 rollouts
