"""Weight loading from a Hugging Face checkpoint directory, and in-place weight sync.

Names are translated to our (= transformers runtime) parameter names; per-expert checkpoint tensors
are placed into the fused expert tensors; under tensor parallelism each rank copies only its slice.
Every name and shape is checked against the model BEFORE any parameter is written, so a bad
checkpoint or a bad sync leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from routereplay.layers.parallel import TP, shard_range

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))  # parameters and persistent buffers, tied names included


def translate(model: nn.Module, name: str) -> tuple[str, tuple[int, str] | None]:
    """Checkpoint or runtime name -> (runtime name, (expert, "gate" | "up" | "down") or None)."""
    family = model.family
    for pattern, repl in family.renames_compiled:
        name = pattern.sub(repl, name)
    m = _EXPERT.match(name)
    if m is None:
        return name, None
    prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
    gate, up, down = family.expert_names
    parts = {gate: "gate", up: "up", down: "down"}
    if part not in parts:
        return name, None
    return f"{prefix}.{'down_proj' if part == down else 'gate_up_proj'}", (expert, parts[part])


def _full_shape(name: str, target: torch.Tensor, shard) -> tuple[int, ...]:
    """The shape the source tensor must have: the unsharded (all ranks) shape of what it fills."""
    shape = list(target.shape)
    if getattr(target, "tp_dim", None) is not None:  # marked where it is made (GPT-OSS experts too)
        shape[target.tp_dim] *= TP.size
    elif name.endswith("experts.gate_up_proj"):
        shape[1] *= TP.size
    elif name.endswith("experts.down_proj"):
        shape[2] *= TP.size
    if shard is None:
        return tuple(shape)
    _, part = shard
    return tuple(shape[1:]) if part == "down" else (shape[1] // 2, *shape[2:])


def _local(name: str, target: torch.Tensor, shard, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination view in the parameter, this rank's slice of the source tensor)."""
    dim = getattr(target, "tp_dim", None)
    if dim is not None:  # marked where it is made (GPT-OSS experts too)
        s, e = shard_range(target.shape[dim] * TP.size)
        return target, tensor.narrow(dim, s, e - s)
    if name.endswith("experts.gate_up_proj"):
        inter = target.shape[1] // 2  # local rows of gate (and of up)
        s, e = shard_range(inter * TP.size)
        if shard is None:  # fused runtime tensor [E, 2I, H] from a trainer
            full = tensor.shape[1] // 2
            return target, torch.cat((tensor[:, s:e], tensor[:, full + s : full + e]), dim=1)
        expert, part = shard
        rows = slice(0, inter) if part == "gate" else slice(inter, 2 * inter)
        return target[expert, rows], tensor[s:e]
    if name.endswith("experts.down_proj"):
        s, e = shard_range(target.shape[2] * TP.size)
        if shard is None:
            return target, tensor[:, :, s:e]
        return target[shard[0]], tensor[:, s:e]
    return target, tensor


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
        expected = _full_shape(name, targets[name], shard)
        if tuple(shape) != expected:
            raise ValueError(f"shape mismatch for {src!r} in {where}: expected {list(expected)}, found {list(shape)}")
        plan.append((src, name, shard))
        if shard is None and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            parts = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
            covered.update((name, e, p) for e in range(targets[name].shape[0]) for p in parts)
        else:
            covered.add((name, *(shard or (None, None))))
    if strict:
        missing = []
        for name, t in targets.items():
            if name == "lm_head.weight" and hf_config.tie_word_embeddings:
                continue
            if name.endswith("experts.gate_up_proj"):
                need = [(name, e, p) for e in range(t.shape[0]) for p in ("gate", "up")]
            elif name.endswith("experts.down_proj"):
                need = [(name, e, "down") for e in range(t.shape[0])]
            else:
                need = [(name, None, None)]
            missing += [n for n in need if n not in covered]
        if missing:
            name, e, part = missing[0]
            what = name if e is None else f"{name} (expert {e}, {part})"
            raise ValueError(f"tensor missing from {where}: {what} ({len(missing)} missing in all)")
    return plan


@torch.no_grad()
def _copy(name: str, target: torch.Tensor, shard, tensor: torch.Tensor) -> None:
    dst, src = _local(name, target, shard, tensor)
    dst.copy_(src)


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
                _copy(name, targets[name], shard, f.get_tensor(src))


def checkpoint_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors checkpoint directory, by name (for update_weights)."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def check_update(model: nn.Module, items: list[tuple[str, torch.Tensor]]) -> list:
    """Raise ValueError naming the first unknown name or wrong shape; nothing is written."""
    return _check(model, [(n, tuple(t.shape)) for n, t in items], "update_weights", strict=False)


WEIGHT_CHUNK_BYTES = 1 << 30  # weights received from elsewhere are written this much at a time: never held twice


def in_chunks(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The (name, tensor) pairs in order, grouped into lists of about WEIGHT_CHUNK_BYTES."""
    chunk, size = [], 0
    for name, t in named_tensors:
        chunk.append((name, t))
        size += t.numel() * t.element_size()
        if size >= WEIGHT_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def update_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """In-place sync of any subset of weights (transformers runtime names or checkpoint names).

    Everything is validated first; then copied. Returns the number of tensors written.
    """
    items = list(named_tensors)
    plan = check_update(model, items)
    tensors = dict(items)
    targets = _targets(model)
    for src, name, shard in plan:
        _copy(name, targets[name], shard, tensors[src])
    return len(plan)
