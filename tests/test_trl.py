"""R3 in TRL's GRPOTrainer: a real ``trl.GRPOTrainer`` run (2 steps, CPU) with rollouts from the engine.

Per completion token we compare the log-prob TRL's loss pass computes (``_get_per_token_logps_and_entropies``
inside ``_compute_loss``, temperature 1) with the log-prob the engine sampled it with.

The tiny model's routers are made nearly tied (all experts' gate rows = one row times ``1 + 1e-5 * noise``),
and the experts' ``down_proj`` scaled by 4 so that the expert choice matters. Then routing flips between the
engine and transformers are frequent, as they are in real MoE RL, but come from rounding alone:

- engine fp32, trainer fp32: with replay the log-probs match to ``FP32_TOL`` (measured max 1.4e-6: float32
  summation-order noise). Without replay, float32 rounding differences between the two implementations
  already flip near-tied expert choices: 3 of the 4 first-step completions differ, max |dp| measured 0.83
  (asserted > 10 * ``FP32_TOL``). This also checks the alignment to TRL's layout: a row shifted by one token
  would force wrong experts and move the log-probs by ~0.1-1.
- engine bf16, trainer fp32: bf16 rounding (~4e-3 relative) decides the engine's choices, so native routing
  disagrees at most tokens (max |dp| measured 2.2, every completion > 0.19). With replay the remaining gap
  is bf16 numerics only (measured max 0.024, tolerance ``BF16_TOL``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from routereplay import LLM
from routereplay.tiny import make_tiny_checkpoint, make_tokenizer

trl = pytest.importorskip("trl")  # optional (not a runtime dependency): imported without an import statement
datasets = pytest.importorskip("datasets")  # comes with trl
R3GRPOTrainer = pytest.importorskip("routereplay.integrations.trl").R3GRPOTrainer

FP32_TOL = 1e-4  # engine fp32 vs transformers fp32, same routing: float32 summation-order noise
BF16_TOL = 0.05  # engine bf16 vs transformers fp32, same routing: bf16 rounding through 4 layers
MOE_LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = make_tiny_checkpoint(str(tmp_path_factory.mktemp("base")), "qwen3_moe", hidden_size=64,
                                num_hidden_layers=MOE_LAYERS, decoder_sparse_step=1, num_experts=16,
                                num_experts_per_tok=4, initializer_range=0.1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.experts.down_proj"):
                p.mul_(4.0)
            if name.endswith("mlp.gate.weight"):  # nearly tied routers
                p.copy_(p[:1] * (1 + 1e-5 * torch.randn(p.shape, generator=noise)))
    path = str(tmp_path_factory.mktemp("tied"))
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


class _Capture(R3GRPOTrainer):
    """Records, per loss pass, max |training log-prob - engine log-prob| over the completion tokens."""

    gaps: list[float]

    def _compute_loss(self, model, inputs):
        inner = self._get_per_token_logps_and_entropies

        def capture(*args, **kwargs):
            out = inner(*args, **kwargs)
            prompts, completions = inputs["prompt_ids"], inputs["completion_ids"]
            for b in range(prompts.size(0)):
                prompt = prompts[b][inputs["prompt_mask"][b].bool()].tolist()
                row = completions[b].tolist()
                tokens, _, logprobs = max((e for e in self.rollouts[tuple(prompt)] if row[: len(e[0])] == e[0]),
                                          key=lambda e: len(e[0]))
                dp = out[0][b, : len(tokens)].detach() - torch.tensor(logprobs)
                self.gaps.append(dp.abs().max().item())
            return out

        self._get_per_token_logps_and_entropies = capture
        try:
            return super()._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies


def _train(model_dir: str, tmp_path, engine_dtype: str, replay: bool, beta: float = 0.0) -> _Capture:
    torch.manual_seed(0)
    llm = LLM(model_dir, dtype=engine_dtype, max_model_len=64, num_kv_blocks=64, routing_replay={"enable": True})
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=2, learning_rate=1e-2, beta=beta, temperature=1.0,
                      report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0, logging_steps=1)
    trainer = _Capture(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
        reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
        train_dataset=datasets.Dataset.from_dict({"prompt": ["hello wor", "abc", "the quick brown", "1+1="]}),
        processing_class=AutoTokenizer.from_pretrained(model_dir), llm=llm, replay=replay,
    )
    trainer.gaps = []
    try:
        trainer.train()
    finally:
        llm.close()
    assert len(trainer.gaps) == 8  # 2 steps x 4 completions
    return trainer


def test_fp32_rollouts_replay_matches_engine_and_replays_every_layer(model_dir, tmp_path):
    trainer = _train(model_dir, tmp_path, "float32", replay=True, beta=0.04)  # beta > 0: the ref model replays
    assert max(trainer.gaps) < FP32_TOL, trainer.gaps
    assert len(trainer._replays) == 2  # policy and reference model
    assert len(trainer.reports) == 2  # last step: reference pass + loss pass
    for report in trainer.reports:
        assert report.moe_layers == MOE_LAYERS and report.layers_replayed == MOE_LAYERS
        assert 0 < report.tokens_replayed < report.tokens  # padding / last tokens fell back
    native = _train(model_dir, tmp_path, "float32", replay=False)
    assert max(native.gaps) > 10 * FP32_TOL, native.gaps  # fp32 rounding alone flips near-tied routers
    assert not native.reports


def test_bf16_rollouts_replay_closes_router_gap(model_dir, tmp_path):
    replayed = _train(model_dir, tmp_path, "bfloat16", replay=True)
    native = _train(model_dir, tmp_path, "bfloat16", replay=False)
    assert max(replayed.gaps) < BF16_TOL, replayed.gaps
    assert max(native.gaps) > 10 * BF16_TOL, native.gaps
    assert all(r.layers_replayed == MOE_LAYERS for r in replayed.reports)
    assert not native.reports


def test_example_runs(tmp_path):
    script = Path(__file__).resolve().parent.parent / "examples" / "trl_grpo_r3.py"
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 4 and "R3: 4/4 MoE layers replayed" in done.stdout
