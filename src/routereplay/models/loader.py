"""Weight loading from a Hugging Face checkpoint directory, and in-place weight sync.

Names are translated to our (= transformers runtime) parameter names; per-expert checkpoint tensors
are placed into the fused expert tensors. Every name and shape is checked against the model BEFORE
any parameter is written, so a bad checkpoint or a bad sync leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import torch
from safetensors import safe_open
from torch import nn

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))  # parameters and persistent buffers, tied names included


def translate(model: nn.Module, name: str) -> tuple[str, tuple[int, int, int] | None]:
    """Checkpoint or runtime name -> (runtime name, (expert, row offset, rows) or None)."""
    family = model.family
    for pattern, repl in family.renames_compiled:
        name = pattern.sub(repl, name)
    m = _EXPERT.match(name)
    if m is None:
        return name, None
    prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
    gate, up, down = family.expert_names
    if part == down:
        return f"{prefix}.down_proj", (expert, 0, -1)
    if part in (gate, up):
        inter = model.get_parameter(f"{prefix}.gate_up_proj").shape[1] // 2
        return f"{prefix}.gate_up_proj", (expert, 0 if part == gate else inter, inter)
    return name, None


def _expected_shape(target: torch.Tensor, shard) -> tuple[int, ...]:
    if shard is None:
        return tuple(target.shape)
    _, _, rows = shard
    sub = target[0]
    return tuple(sub.shape) if rows == -1 else (rows, *sub.shape[1:])


def _check(model, items: Iterable[tuple[str, tuple[int, ...]]], where: str, strict: bool):
    """Validate names and shapes; return the plan [(source name, runtime name, shard)]."""
    targets = _targets(model)
    hf_config = model.hf_config
    plan, covered = [], set()
    for src, shape in items:
        if model.family.ignore(hf_config, src):
            continue
        name, shard = translate(model, src)
        if name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue  # tied to the embedding, which is loaded under its own name
        if name not in targets:
            raise ValueError(f"unexpected tensor {src!r} in {where} (no such parameter in {model.family.model_type})")
        expected = _expected_shape(targets[name], shard)
        if tuple(shape) != expected:
            raise ValueError(f"shape mismatch for {src!r} in {where}: expected {list(expected)}, found {list(shape)}")
        plan.append((src, name, shard))
        covered.add((name, shard[0] if shard else None, shard[1] if shard else None))
    if strict:
        missing = []
        for name, t in targets.items():
            if name == "lm_head.weight" and hf_config.tie_word_embeddings:
                continue
            if name.endswith("gate_up_proj"):
                inter = t.shape[1] // 2
                need = [(name, e, off) for e in range(t.shape[0]) for off in (0, inter)]
            elif name.endswith("experts.down_proj"):
                need = [(name, e, 0) for e in range(t.shape[0])]
            else:
                need = [(name, None, None)]
            missing += [n for n in need if n not in covered]
        if missing:
            name, e, off = missing[0]
            what = name if e is None else f"{name} (expert {e}{', up' if off else ''})"
            raise ValueError(f"tensor missing from {where}: {what} ({len(missing)} missing in all)")
    return plan


@torch.no_grad()
def _copy(target: torch.Tensor, shard, tensor: torch.Tensor) -> None:
    if shard is None:
        target.copy_(tensor)
        return
    e, off, rows = shard
    dst = target[e] if rows == -1 else target[e, off : off + rows]
    dst.copy_(tensor)


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r}")
    return [os.path.join(model_dir, f) for f in files]


def load_checkpoint(model: nn.Module, model_dir: str) -> None:
    """Load every tensor of the checkpoint; fail (before writing anything) on a missing,
    unexpected or misshapen tensor."""
    files = checkpoint_files(model_dir)
    shapes, owner = [], {}
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                shapes.append((key, tuple(f.get_slice(key).get_shape())))
                owner[key] = path
    plan = _check(model, shapes, model_dir, strict=True)
    targets = _targets(model)
    by_file: dict[str, list] = {}
    for src, name, shard in plan:
        by_file.setdefault(owner[src], []).append((src, name, shard))
    for path, entries in by_file.items():
        with safe_open(path, "pt") as f:
            for src, name, shard in entries:
                _copy(targets[name], shard, f.get_tensor(src))


def update_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """In-place sync of any subset of weights (transformers runtime names or checkpoint names).

    Everything is validated first; then copied. Returns the number of tensors written.
    """
    items = list(named_tensors)
    plan = _check(model, [(n, tuple(t.shape)) for n, t in items], "update_weights", strict=False)
    tensors = dict(items)
    targets = _targets(model)
    for src, name, shard in plan:
        _copy(targets[name], shard, tensors[src])
    return len(plan)
