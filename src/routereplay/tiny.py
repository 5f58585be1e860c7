"""Tiny random checkpoints of every family, written by transformers' `save_pretrained`.

Used by the tests, the README's first command and the demo: no downloads, real safetensors files
in the layout the Hub uses, plus a character-level tokenizer (made with the `tokenizers` library)
and a chat template, so string prompts and the chat API work end to end.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

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


# Tiny block-FP8 checkpoints. Blocks of 16 rows x 32 columns: 32 is the smallest K block (and activation group) the
# Triton kernels take, and with these widths every tensor-parallel shard at TP=2 starts on a block boundary.
FP8_BLOCK = (16, 32)
FP8_WIDTHS = dict(intermediate_size=128, moe_intermediate_size=64)
FP8_FAMILY_WIDTHS = {"deepseek_v3": dict(v_head_dim=16)}  # kv_b_proj / o_proj shards of whole blocks at TP=2
# What each family's shipped config says beside the block size: Qwen3-*-FP8 lists lm_head and its routers in
# modules_to_not_convert, DeepSeek-V3 lists nothing (with "fmt"), MiniMax-style checkpoints use `ignored_layers`
# (used here for GLM). Qwen and GLM also keep one real projection unconverted, so bf16 beside FP8 is exercised.
FP8_STYLE = {
    "qwen3_moe": lambda moe_layers: {"modules_to_not_convert": [
        "lm_head", *(f"model.layers.{i}.mlp.gate" for i in moe_layers), "model.layers.0.self_attn.o_proj"]},
    "glm4_moe": lambda moe_layers: {"ignored_layers": ["model.layers.0.mlp"]},
    "deepseek_v3": lambda moe_layers: {"fmt": "e4m3"},
}


@dataclass(frozen=True)
class TinyFp8:
    fp8: str  # e4m3 weights + weight_scale_inv, quantization_config in config.json: the shipped layout
    reference: str  # the same model with the dequantized weights in fp32 and no quantization_config
    original: str  # the unquantized checkpoint the FP8 one was made from


def quantized_names(tensors: dict, converts) -> list[str]:
    """The checkpoint weights shipped FP8 checkpoints quantize: every 2-D projection of a decoder layer (attention,
    MLP, shared and routed experts) whose module ``converts`` (a name predicate); never routers (mlp.gate),
    norms, embeddings or the LM head."""
    return sorted(n for n, t in tensors.items()
                  if n.startswith("model.layers.") and n.endswith(".weight") and t.dim() == 2
                  and not n.endswith("mlp.gate.weight") and converts(n.removesuffix(".weight")))


def make_tiny_fp8_checkpoint(path: str, model_type: str = "qwen3_moe", block: tuple[int, int] = FP8_BLOCK,
                             seed: int = 0) -> TinyFp8:
    """Write (or reuse) a tiny FP8 checkpoint of ``model_type`` under ``path``: transformers' tiny random model,
    each weight of `quantized_names` quantized into e4m3 + per-block fp32 ``weight_scale_inv`` and saved with
    safetensors; beside it the dequantized-weights reference and the original."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from routereplay.config import Fp8Config, ModelConfig
    from routereplay.kernels.fp8 import dequantize_block_weight, quantize_block_weight

    out = TinyFp8(*(os.path.join(path, d) for d in ("fp8", "reference", "original")))
    if all(os.path.exists(os.path.join(d, "config.json")) for d in (out.fp8, out.reference)):
        return out
    make_tiny_checkpoint(out.original, model_type, seed, **FP8_WIDTHS, **FP8_FAMILY_WIDTHS.get(model_type, {}))
    style = FP8_STYLE[model_type](ModelConfig.from_dir(out.original).moe_layer_ids)
    qc = {"activation_scheme": "dynamic", "quant_method": "fp8", "weight_block_size": list(block), **style}
    skip = Fp8Config(block, True, tuple(style.get("modules_to_not_convert", style.get("ignored_layers", []))))
    tensors = load_file(os.path.join(out.original, "model.safetensors"))
    fp8, reference = dict(tensors), dict(tensors)
    for name in quantized_names(tensors, skip.converts):
        w, scale = quantize_block_weight(tensors[name], block)
        fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = w, scale
        reference[name] = dequantize_block_weight(w, scale, block)
    config = json.load(open(os.path.join(out.original, "config.json")))
    for d, ts, cfg in ((out.fp8, fp8, {**config, "quantization_config": qc}), (out.reference, reference, config)):
        shutil.copytree(out.original, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file(ts, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    return out
