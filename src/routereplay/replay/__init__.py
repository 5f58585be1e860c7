"""Trainer-side routing replay: R3 (replay rollout routing) and R2 (record, then replay) for
Hugging Face transformers MoE models, and alignment of stored routing to training batches."""

from routereplay.replay.align import AlignedRouting, align, align_packed
from routereplay.replay.hf import STEP_KWARG, SUPPORTED_FAMILIES, ReplayReport, RoutingRecord, RoutingReplay

__all__ = [
    "STEP_KWARG",
    "SUPPORTED_FAMILIES",
    "AlignedRouting",
    "ReplayReport",
    "RoutingRecord",
    "RoutingReplay",
    "align",
    "align_packed",
]
