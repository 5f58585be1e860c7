"""GRPO with Rollout Routing Replay (R3): the loop to copy into your own trainer.

    rollouts (engine, bf16, routing recorded into a store)
      -> rewards, group-normalised advantages
      -> training forward (transformers, fp32) that replays the rollout's experts, read from the store
      -> policy-gradient step -> sync the new weights into the engine

Runs on CPU in under a minute on a small random Qwen3-MoE; task: make the model write digits.

    python examples/grpo_r3.py
"""

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from routereplay import LLM, SamplingParams, store
from routereplay.metrics import policy_mismatch, router_disagreement
from routereplay.replay import RoutingReplay, align
from routereplay.tiny import make_tiny_checkpoint

STEPS, PROMPTS, SAMPLES, PROMPT_LEN, MAX_TOKENS = 8, 8, 8, 16, 32
LR, CLIP = 1e-3, 0.2
DIGITS = set(range(3, 13))  # '0'..'9' in the tiny character-level tokenizer
STORE_DIR = "./grpo-r3-routing"
torch.set_num_threads(1)  # tiny matrices: one thread is fastest

model_dir = make_tiny_checkpoint(
    "./grpo-r3-model", "qwen3_moe", hidden_size=128, num_hidden_layers=6, decoder_sparse_step=1,
    num_experts=32, num_experts_per_tok=4, initializer_range=0.1,
)
# Rollout engine: bf16, records each token's experts in every MoE layer into a local store.
llm = LLM(model_dir, dtype="bfloat16", max_model_len=PROMPT_LEN + MAX_TOKENS, num_kv_blocks=256,
          routing_replay={"enable": True, "store": "local", "local_store_dir": STORE_DIR})
routing_store = store.open(STORE_DIR)
# Trainer: the same checkpoint in transformers, fp32.
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
rr = RoutingReplay(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
rng = np.random.default_rng(0)


def token_logprobs(input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token at temperature 1, the distribution the engine sampled from."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]


print("step  reward  k3 KL (R3)  k3 KL (native)  router disagreement (native)  MoE layers, tokens replayed")
for step in range(STEPS):
    # 1. Rollouts: SAMPLES per prompt; routing lands in the store under "{rollout_id}/{i}".
    prompts = rng.integers(3, 103, size=(PROMPTS, PROMPT_LEN)).tolist()
    params = [SamplingParams(n=SAMPLES, temperature=1.0, max_tokens=MAX_TOKENS, seed=1000 * step + i,
                             rollout_id=f"step{step}/prompt{i}") for i in range(PROMPTS)]
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)

    # 2. Rewards and GRPO advantages, normalised within each prompt's group of samples.
    rewards = np.array([[sum(t in DIGITS for t in c.token_ids) / len(c.token_ids) for c in out.outputs]
                        for out in outputs])
    advantages = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)

    # 3. Right-padded batch. Input = the sequence without its last token (which has no routing row),
    #    so position t predicts token t + 1 and every input position has a rollout routing row.
    samples = [(out.prompt_token_ids, c) for out in outputs for c in out.outputs]
    lengths = [len(p) + len(c.token_ids) - 1 for p, c in samples]
    batch, seq = len(samples), max(lengths)
    input_ids = torch.zeros(batch, seq, dtype=torch.long)
    targets = torch.zeros(batch, seq, dtype=torch.long)
    response = torch.zeros(batch, seq, dtype=torch.bool)
    rollout_logprobs = torch.zeros(batch, seq)
    for i, (prompt, c) in enumerate(samples):
        tokens = prompt + c.token_ids
        input_ids[i, : lengths[i]] = torch.tensor(tokens[:-1])
        targets[i, : lengths[i]] = torch.tensor(tokens[1:])
        response[i, len(prompt) - 1 : lengths[i]] = True
        rollout_logprobs[i, len(prompt) - 1 : lengths[i]] = torch.tensor(c.logprobs)
    attention_mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    adv = torch.tensor(advantages, dtype=torch.float32).reshape(batch, 1)

    # 4. R3: fetch the rollout routing by key, lay it out like the batch ([B, T, L, K] + mask [B, T]).
    routing, mask = align(routing_store.get_many([c.routing_key for _, c in samples]), lengths)

    # Optional diagnostic: what the trainer's own routers would do on these rollouts.
    with torch.no_grad(), rr.record() as rec:
        native_logprobs = token_logprobs(input_ids, attention_mask, targets)

    # 5. Training forward with the rollout's experts replayed (gate weights still come from the
    #    trainer's router, so it keeps learning); PPO-clipped ratio against the rollout log-probs.
    with rr.replay(routing, mask) as report:  # a forward that misses a router is an error, not silence
        logprobs = token_logprobs(input_ids, attention_mask, targets)
    ratio = torch.exp(logprobs - rollout_logprobs)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv)
    loss = -(surrogate * response).sum() / response.sum()
    loss.backward()  # after the context: gradient-checkpointed layers still recompute with the replayed experts
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # 6. Sync the trained weights into the rollout engine (transformers parameter names work as is).
    llm.update_weights(model.named_parameters())

    replayed = policy_mismatch(logprobs.detach(), rollout_logprobs, response)
    native = policy_mismatch(native_logprobs, rollout_logprobs, response)
    disagreement = router_disagreement(routing.long(), rec.routing, mask)
    print(f"{step:>4}  {rewards.mean():6.3f}  {replayed.k3_kl:10.2e}  {native.k3_kl:14.2e}  "
          f"{disagreement.pair_rate:28.2%}  {report.layers_replayed}/{len(rr.moe_layer_ids)} {report.tokens_replayed}")

llm.close()
routing_store.close()
