"""The per-step forward context: one small object that every layer reads (nano-vllm style).

The model runner sets it before a forward and resets it after; layers never receive metadata
through their call signatures, which keeps the model code identical for eager and CUDA-graph runs.
"""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Context:
    positions: torch.Tensor | None = None  # [N] absolute position of every token of the step
    slot_mapping: torch.Tensor | None = None  # [N] KV slot of every token, -1 = padding (write nowhere)
    # varlen (prefill / mixed) metadata; None in a pure decode step
    cu_seqlens_q: torch.Tensor | None = None  # [S+1]
    max_seqlen_q: int = 0
    context_lens: torch.Tensor | None = None  # [S] tokens in the cache after this step
    block_tables: torch.Tensor | None = None  # [S, max_blocks]
    is_decode: bool = False  # every sequence contributes exactly one token
    routing_cache: torch.Tensor | None = None  # [num_slots + 1, L_moe, K]; last row absorbs padding
    routing_debug: bool = False  # write absolute positions instead of expert ids
    # Filled by the model at the start of its forward (from `positions`), read by every attention layer:
    # rotary cos/sin [N, rotary_dim] (Rotary.cos_sin), computed once per step instead of once per layer.
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    set_context(Context())
