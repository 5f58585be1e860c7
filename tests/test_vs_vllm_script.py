"""benchmarks/vs_vllm.py on CPU at tiny shapes (``--smoke``), run as a user runs it: the GPU machine is the
only place it is timed, so here it must at least run end to end and write what the table reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _script(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_vllm.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_onoff_takes_turns_and_records_every_pass(ckpt: str, tmp_path: Path) -> None:
    """Two engines in one process, KV pools released and resumed before every pass: each row gets the asked
    number of passes per side, in the order off, on, on, off (the script asserts the off engine has no
    routing cache and every on output carries its routing)."""
    out = tmp_path / "pair.json"
    log = _script("onoff", "--dir", ckpt, "--json", str(out), "--smoke", "--take-turns", "--rows", "a,b",
                  "--pairs", "2", "--output-scale", "1")
    res = json.loads(out.read_text())
    assert res["take_turns"] is True
    for row in ("a", "b"):
        passes = res["rows"][row]["passes"]
        assert [len(passes["on"]), len(passes["off"])] == [2, 2]
        assert all(p["out_tok_s"] > 0 and p["profile"]["decode_steps"] > 0 for v in passes.values() for p in v)
        assert res["rows"][row]["on_off"] > 0
    order = [line.split()[2].rstrip(":") for line in log.splitlines() if line.startswith("  a routing")]
    assert order == ["off", "on", "on", "off"]


def test_run_writes_every_row_and_the_table_reads_it(ckpt: str, tmp_path: Path) -> None:
    """Every row of one engine process, with in-engine return pairs; the greedy row's routing file holds one
    row per forwarded token (prompt + output - 1) per MoE layer; ``table`` reads the JSON."""
    out = tmp_path / "ours.json"
    _script("run", "--engine", "routereplay", "--dir", ckpt, "--json", str(out), "--smoke",
            "--return-pairs", "2")
    rows = json.loads(out.read_text())["rows"]
    assert {"a_pass1", "a_pass2", "b", "c", "d", "a_return_on1", "a_return_off2"} <= set(rows)
    assert rows["d"]["ms_per_token"] > 0
    routing = np.load(str(out).replace(".json", "_routing.npz"))
    config = json.loads((Path(ckpt) / "config.json").read_text())
    prompts, prompt_len = int(routing["prompts"]), int(routing["input_len"])
    for i in range(prompts):
        tokens = routing[f"tokens{i}"]
        assert routing[f"routing{i}"].shape[0] == prompt_len + len(tokens) - 1
        assert routing[f"routing{i}"].shape[2] == config["num_experts_per_tok"]
    table = _script("table", str(out))
    assert "routereplay, one engine, row a with routing returned / not returned" in table
