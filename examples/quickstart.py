"""Greedy generation with routing capture on a tiny random MoE checkpoint (created on first run)."""

from routereplay import LLM, SamplingParams
from routereplay.tiny import make_tiny_checkpoint

model_dir = make_tiny_checkpoint("./tiny-qwen3-moe", "qwen3_moe")
llm = LLM(model_dir, routing_replay={"enable": True})
out = llm.generate(["The experts of this token are"], SamplingParams(temperature=0, max_tokens=16))[0]
completion = out.outputs[0]
print("generated:", repr(completion.text))
print("routed_experts:", completion.routed_experts.shape, completion.routed_experts.dtype,
      "= [prompt + generated - 1 tokens, MoE layers", out.moe_layer_ids, ", top-k]")
print("experts of the first token per MoE layer:", completion.routed_experts[0].tolist())
