"""Service mode: the rollout server in its own process, the trainer talking HTTP to it.

Each step: sample a group of rollouts through the OpenAI API (plain HTTP here, so the base install
runs it; the `openai` client sends the same body) with their routing stored under a rollout id;
train (here: one small random nudge standing in for a GRPO step, see grpo_r3.py for the real loop
with replay); save the weights; pause the server, load them, continue. Rollouts of the next step
therefore come from the new policy only.

    python examples/server_loop.py
"""

import socket
import subprocess
import sys
import time

import httpx
import torch
from transformers import AutoModelForCausalLM

from routereplay import store
from routereplay.tiny import make_tiny_checkpoint

STEPS = 3
with socket.socket() as probe:  # a free port
    probe.bind(("127.0.0.1", 0))
    PORT = probe.getsockname()[1]
model_dir = make_tiny_checkpoint("./server-loop-model", "qwen3_moe")
routing = '{"enable": true, "store": "local", "local_store_dir": "./server-loop-routing"}'
server = subprocess.Popen([sys.executable, "-m", "routereplay.cli", "serve", "--model", model_dir, "--port", str(PORT),
                           "--routing-replay", routing, "--max-model-len", "256", "--log-level", "warning"])
url = f"http://127.0.0.1:{PORT}"
try:
    deadline = time.monotonic() + 120
    while True:  # the server imports torch and loads the model first
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
        time.sleep(0.2)
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    routing_store = store.open("./server-loop-routing")
    for step in range(STEPS):
        out = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": model_dir, "prompt": [5, 6, 7, 8], "n": 4, "max_tokens": 16, "temperature": 1.0,
            "rollout_id": f"step{step}", "ignore_eos": True})
        out.raise_for_status()
        keys = [c["routing_key"] for c in out.json()["choices"]]  # step{step}/0 .. /3: prompt + completion - 1 rows
        rows = [routing_store.get(k).shape[0] for k in keys]

        with torch.no_grad():  # stand-in for the training step
            for p in trainer.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        trainer.save_pretrained(f"./server-loop-step{step}")

        httpx.post(f"{url}/pause_generation").raise_for_status()
        synced = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": f"./server-loop-step{step}"},
                            timeout=120)
        synced.raise_for_status()
        httpx.post(f"{url}/continue_generation").raise_for_status()
        print(f"step {step}: {len(keys)} rollouts, routing rows {rows}, synced {synced.json()['num_tensors']} tensors")
finally:
    server.terminate()
    server.wait(timeout=60)
