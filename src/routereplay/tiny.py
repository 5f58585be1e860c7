"""Tiny random checkpoints of every family, written by transformers' `save_pretrained`.

Used by the tests, the README's first command and the demo: no downloads, real safetensors files
in the layout the Hub uses, plus a character-level tokenizer (made with the `tokenizers` library)
and a chat template, so string prompts and the chat API work end to end.
"""

from __future__ import annotations

import os
import string

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)

# Each mixes dense and MoE layers where the family allows it, so moe_layer_ids is never trivial.
TINY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2,
                      norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[0]),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=4,
                     topk_group=2, first_k_dense_replace=1, n_shared_experts=1, partial_rotary_factor=0.5,
                     use_qk_norm=True, routed_scaling_factor=2.5, norm_topk_prob=True),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=1, moe_layer_interval=1, tie_word_embeddings=True),
    # MLA (q/kv latents, v_head_dim != qk dim) with YaRN rope, as DeepSeek-V3 / Kimi-K2 ship it
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=4, topk_group=2,
                        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, head_dim=8, v_head_dim=12, initializer_range=0.1,
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
                                             mscale=1.0, mscale_all_dim=1.0)),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.1,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=256)),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(path: str) -> None:
    """A character-level tokenizer: ids 0-2 special, then printable ASCII."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_tiny_checkpoint(path: str, model_type: str = "qwen3_moe", seed: int = 0, **overrides) -> str:
    """Write (or reuse, if present) a tiny random checkpoint of `model_type` at `path`."""
    if os.path.exists(os.path.join(path, "config.json")) and not overrides:
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**COMMON, **TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random biases, so selection-only and once-per-sum biases are actually exercised
        for name, buf in list(model.named_parameters()) + list(model.named_buffers()):
            if "e_score_correction_bias" in name:
                buf.copy_(torch.rand_like(buf) * 0.1)
            elif model_type == "gpt_oss" and name.endswith("bias"):  # transformers starts them at 0
                buf.normal_(0.0, 0.1)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path
