"""Weight loading from a Hugging Face checkpoint directory, and in-place weight sync.

Names are translated to our (= transformers runtime) parameter names; per-expert checkpoint tensors
are placed into the fused expert tensors; under tensor parallelism each rank copies only its slice.
Every name, shape and dtype is checked against the model BEFORE any parameter is written, so a bad
checkpoint or a bad sync leaves the model untouched.

Block-FP8 models: an e4m3 ``X.weight`` is copied with its ``X.weight_scale_inv`` (per-expert ones fused like
the weights: ``experts.gate_up_proj_scale_inv``, ``experts.down_proj_scale_inv``); a float tensor for an e4m3
parameter (a bf16 checkpoint quantized as it loads, or a trainer's update) is quantized into the weight and
its scale in place, per rank after slicing (shards start on block boundaries, so this equals slicing the
quantized whole). Scales must be finite and positive.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from routereplay.kernels.fp8 import FP8_DTYPE, quantize_block_weight
from routereplay.layers.parallel import TP, shard_range

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.(weight|weight_scale_inv)$")
SCALE = "_scale_inv"  # X.weight -> X.weight_scale_inv, experts.gate_up_proj -> experts.gate_up_proj_scale_inv
# safetensors header dtypes we may meet
_DTYPES = {"F8_E4M3": FP8_DTYPE, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
           "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
           "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


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
    scale = SCALE if m.group(4) == "weight_scale_inv" else ""
    return f"{prefix}.{'down_proj' if part == down else 'gate_up_proj'}{scale}", (expert, parts[part])


def _fused(name: str) -> str | None:
    """"gate_up" / "down" for the fused expert tensors (and their FP8 scales), else None."""
    for kind in ("gate_up", "down"):
        if name.endswith((f"experts.{kind}_proj", f"experts.{kind}_proj{SCALE}")):
            return kind
    return None


def _full_shape(name: str, target: torch.Tensor, shard) -> tuple[int, ...]:
    """The shape the source tensor must have: the unsharded (all ranks) shape of what it fills."""
    shape = list(target.shape)
    if getattr(target, "tp_dim", None) is not None:  # marked where it is made (GPT-OSS experts too)
        shape[target.tp_dim] *= TP.size
    elif _fused(name) == "gate_up":
        shape[1] *= TP.size
    elif _fused(name) == "down":
        shape[2] *= TP.size
    if shard is None:
        return tuple(shape)
    _, part = shard
    return tuple(shape[1:]) if part == "down" else (shape[1] // 2, *shape[2:])


def _dst(name: str, target: torch.Tensor, shard) -> torch.Tensor:
    """The view of the parameter that a source tensor (one expert's gate, up or down, or all of it) fills."""
    if shard is None or _fused(name) is None:
        return target
    expert, part = shard
    if part == "down":
        return target[expert]
    half = target.shape[1] // 2  # local rows of gate (and of up)
    return target[expert, :half] if part == "gate" else target[expert, half:]


def _src(name: str, target: torch.Tensor, shard, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the source tensor."""
    dim = getattr(target, "tp_dim", None)
    if dim is not None:  # marked where it is made (GPT-OSS experts too)
        s, e = shard_range(target.shape[dim] * TP.size)
        return tensor.narrow(dim, s, e - s)
    kind = _fused(name)
    if kind == "gate_up":
        s, e = shard_range(target.shape[1] // 2 * TP.size)
        if shard is None:  # fused runtime tensor [E, 2I, H] from a trainer
            full = tensor.shape[1] // 2
            return torch.cat((tensor[:, s:e], tensor[:, full + s : full + e]), dim=1)
        return tensor[s:e]
    if kind == "down":
        s, e = shard_range(target.shape[2] * TP.size)
        return tensor[:, :, s:e] if shard is None else tensor[:, s:e]
    return tensor


def _quantizes(src: str, target: torch.Tensor, dtype: torch.dtype, where: str, fp8_checkpoint: bool) -> bool:
    """Whether ``src`` is quantized into an e4m3 target (else copied); refuse a dtype that does not fit."""
    wide_float = dtype.is_floating_point and dtype.itemsize > 1
    if src.endswith(SCALE):
        if not wide_float:
            raise ValueError(f"{src!r} in {where} is {dtype}: a weight_scale_inv must be float32 (or bf16 / fp16)")
        return False
    if target.dtype != FP8_DTYPE:
        if dtype.is_floating_point and not wide_float:
            raise ValueError(f"{src!r} in {where} is {dtype}, but its module is not quantized (routers, norms, "
                             "embeddings, the LM head and modules_to_not_convert keep their dtype)")
        return False
    if dtype == FP8_DTYPE:
        return False
    if not wide_float:
        raise ValueError(f"{src!r} in {where} is {dtype}: expected {FP8_DTYPE}, or a float tensor to quantize")
    if fp8_checkpoint:
        raise ValueError(f"{src!r} in {where} is {dtype}, but the checkpoint's quantization_config converts its "
                         f"module: expected {FP8_DTYPE} with a weight_scale_inv (modules kept in higher "
                         "precision are listed in modules_to_not_convert)")
    return True


def check_scale(src: str, tensor: torch.Tensor, where: str) -> None:
    """Block scales must be finite and positive: anything else silently zeroes, flips or NaNs a block."""
    bad = ~(torch.isfinite(tensor) & (tensor > 0))
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{src!r} in {where}: weight_scale_inv must be finite and > 0, found {int(bad.sum())} bad "
                         f"value(s) (first {tensor[first].item()} at block {list(first)})")


def _covers(name: str, target: torch.Tensor, shard) -> list[tuple]:
    """The (name, expert, part) units a source tensor fills; a fused expert tensor fills every expert's."""
    kind = _fused(name)
    if shard is None and kind is not None:
        parts = ("gate", "up") if kind == "gate_up" else ("down",)
        return [(name, e, p) for e in range(target.shape[0]) for p in parts]
    return [(name, *(shard or (None, None)))]


def _check(model, items: Iterable[tuple[str, tuple[int, ...], torch.dtype]], where: str, strict: bool,
           fp8_checkpoint: bool = False):
    """Validate names, shapes and dtypes; return the plan [(source name, runtime name, shard, quantize)]."""
    targets = _targets(model)
    hf_config = model.hf_config
    plan, covered = [], set()
    for src, shape, dtype in items:
        if model.family.ignore(hf_config, src):
            continue
        name, shard = translate(model, src)
        if name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue  # tied to the embedding, which is loaded under its own name
        if name not in targets:
            why = " (its module is not quantized)" if name.endswith(SCALE) else ""
            raise ValueError(f"unexpected tensor {src!r} in {where} (no such parameter in "
                             f"{model.family.model_type}{why})")
        expected = _full_shape(name, targets[name], shard)
        if tuple(shape) != expected:
            why = ""
            if name.endswith(SCALE):
                weight = targets[name.removesuffix(SCALE)]
                why = (f" (one scale per {list(weight.block)} block of the weight "
                       f"{list(_full_shape(name.removesuffix(SCALE), weight, shard))})")
            raise ValueError(f"shape mismatch for {src!r} in {where}: expected {list(expected)}, found "
                             f"{list(shape)}{why}")
        quantize = _quantizes(src, targets[name], dtype, where, fp8_checkpoint)
        plan.append((src, name, shard, quantize))
        covered.update(_covers(name, targets[name], shard))
        if quantize:
            covered.update(_covers(name + SCALE, targets[name + SCALE], shard))
    if strict:
        missing = []
        for name, t in targets.items():
            if name == "lm_head.weight" and hf_config.tie_word_embeddings:
                continue
            missing += [n for n in _covers(name, t, None) if n not in covered]
        if missing:
            name, e, part = missing[0]
            what = name if e is None else f"{name} (expert {e}, {part})"
            raise ValueError(f"tensor missing from {where}: {what} ({len(missing)} missing in all)")
    return plan


@torch.no_grad()
def _write(targets: dict[str, torch.Tensor], name: str, shard, quantize: bool, tensor: torch.Tensor) -> None:
    target = targets[name]
    src = _src(name, target, shard, tensor)
    if not quantize:
        _dst(name, target, shard).copy_(src)
        return
    weight, scale = quantize_block_weight(src.to(target.device), target.block)
    _dst(name, target, shard).copy_(weight)
    _dst(name + SCALE, targets[name + SCALE], shard).copy_(scale)


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
    """Load every tensor of the checkpoint; fail (before writing anything) on a missing, unexpected,
    misshapen or mistyped tensor, or a bad FP8 scale."""
    files = checkpoint_files(model_dir)
    items, owner = [], {}
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ValueError(f"{key!r} in {model_dir} has unsupported dtype {sl.get_dtype()}")
                items.append((key, tuple(sl.get_shape()), dtype))
                owner[key] = path
    quant = getattr(model, "quant", None)
    plan = _check(model, items, model_dir, strict=True, fp8_checkpoint=quant is not None and quant.prequantized)
    by_file: dict[str, list] = {}
    for entry in plan:
        by_file.setdefault(owner[entry[0]], []).append(entry)
    scales = {}  # read and checked before anything is written (small: one value per block)
    for path, entries in by_file.items():
        with safe_open(path, "pt") as f:
            for src, name, _, _ in entries:
                if name.endswith(SCALE):
                    scales[src] = f.get_tensor(src)
                    check_scale(src, scales[src], model_dir)
    targets = _targets(model)
    for path, entries in by_file.items():
        with safe_open(path, "pt") as f:
            for src, name, shard, quantize in entries:
                _write(targets, name, shard, quantize, scales[src] if src in scales else f.get_tensor(src))


def checkpoint_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors checkpoint directory, by name (for update_weights)."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def check_update(model: nn.Module, items: list[tuple[str, torch.Tensor]]) -> list:
    """Raise ValueError naming the first unknown name, wrong shape or dtype, or bad FP8 scale; nothing is written.

    Float tensors for FP8 parameters are quantized in place (a bf16 trainer's weights); e4m3 tensors are copied
    as they are, with whatever weight_scale_inv the update also carries.
    """
    plan = _check(model, [(n, tuple(t.shape), t.dtype) for n, t in items], "update_weights", strict=False)
    tensors = dict(items)
    for src, name, _, _ in plan:
        if name.endswith(SCALE) and not tensors[src].is_meta:
            check_scale(src, tensors[src], "update_weights")
    return plan


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
    for src, name, shard, quantize in plan:
        _write(targets, name, shard, quantize, tensors[src])
    return len(plan)
