"""TRL's GRPOTrainer with Rollout Routing Replay (R3), on a small random Qwen3-MoE (CPU, ~10 s).

The routereplay engine (bf16) samples the rollouts and returns each completion's experts; every policy
forward TRL runs to score them (old / reference log-probs, the loss) replays those experts in the fp32
transformers model. The engine gets the policy's weights after every optimizer step.

    pip install "trl>=1.16"
    python examples/trl_grpo_r3.py
"""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

from routereplay import LLM
from routereplay.integrations.trl import R3GRPOTrainer
from routereplay.tiny import make_tiny_checkpoint

torch.set_num_threads(1)  # tiny matrices: one thread is fastest
model_dir = make_tiny_checkpoint("./trl-r3-model", "qwen3_moe", hidden_size=64, num_hidden_layers=4,
                                 decoder_sparse_step=1, num_experts=16, num_experts_per_tok=4)
# Rollout engine on the same checkpoint, returning the routing of every completion.
llm = LLM(model_dir, dtype="bfloat16", max_model_len=64, num_kv_blocks=128, routing_replay={"enable": True})


def digits(completions: list[str], **_) -> list[float]:
    """Reward: the fraction of characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


args = GRPOConfig(
    output_dir="./trl-r3-out", max_steps=4, per_device_train_batch_size=8, num_generations=4,
    max_completion_length=16, learning_rate=1e-3, beta=0.04,  # beta > 0: the reference model replays too
    logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
)
trainer = R3GRPOTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args, reward_funcs=digits,
    train_dataset=Dataset.from_dict({"prompt": ["count: 1 2 3", "pi = 3.14", "year 19", "abc"] * 4}),
    processing_class=AutoTokenizer.from_pretrained(model_dir), llm=llm,
)
trainer.train()

for log in trainer.state.log_history:
    if "reward" in log:
        print(f"step {log['step']}: reward {log['reward']:.3f}  replayed tokens {log['r3/tokens_replayed_frac']:.0%}")
report = trainer.reports[-1]  # the last loss pass
print(f"R3: {report.layers_replayed}/{report.moe_layers} MoE layers replayed, "
      f"{report.tokens_replayed}/{report.tokens} tokens (the rest: padding and each sample's last token)")
llm.close()
