"""Every option, validated, and every model fact derived, in one place.

`ModelConfig` states what the engine and the routing capture need to know about a checkpoint
(`moe_layer_ids`, `num_experts`, `top_k`, the routing dtype); nothing else recomputes these.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from routereplay.models import ALIASES, get_family
from routereplay.models.family import Family
from routereplay.routing.codec import routing_dtype

log = logging.getLogger("routereplay.config")

STORES = ("none", "local", "redis")


@dataclass(slots=True)
class RoutingReplayConfig:
    """Rollout routing capture. `debug` records absolute token positions instead of expert ids."""

    enable: bool = False
    store: str = "none"
    local_store_dir: str = "./routing"
    redis_url: str = "redis://127.0.0.1:6379/0"
    return_routed_experts: bool = True
    debug: bool = False
    store_queue_size: int = 256

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"routing_replay.store must be one of {STORES}, got {self.store!r}")
        for name in ("enable", "return_routed_experts", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"routing_replay.{name} must be a boolean, got {getattr(self, name)!r}")
        if self.store != "none" and not self.enable:
            raise ValueError("routing_replay.store is set but routing_replay.enable is false")
        if self.store_queue_size < 1:
            raise ValueError("routing_replay.store_queue_size must be >= 1")

    @classmethod
    def coerce(cls, value: RoutingReplayConfig | dict | str | None) -> RoutingReplayConfig:
        """Accept the object, a dict, or the JSON string given on the command line."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--routing-replay is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"routing_replay must be a dict or JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown routing_replay field(s) {unknown}; known: {sorted(known)}")
        return cls(**value)

    @property
    def store_url(self) -> str | None:
        return {"none": None, "local": self.local_store_dir, "redis": self.redis_url}[self.store]

    def to_dict(self) -> dict:
        return asdict(self)


def read_hf_config(model_dir: str):
    """The checkpoint's transformers config, with errors that say what is wrong with the directory."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{model_dir!r} has no config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path} has no 'model_type'")
    get_family(raw["model_type"])  # unsupported families fail here, with the supported list
    from transformers import AutoConfig

    try:
        if raw["model_type"] in ALIASES:  # e.g. Kimi-K2: DeepSeek-V3's config under its own name
            fields_ = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
            return AutoConfig.for_model(ALIASES[raw["model_type"]], **fields_)
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a malformed config
        raise ValueError(f"cannot parse {path}: {e}") from e


DEFAULT_FP8_BLOCK = (128, 128)  # weight_block_size of the shipped FP8 checkpoints; on-the-fly quantization's default
# quantization_config keys we understand (transformers' FineGrainedFP8Config as saved, DeepSeek's `fmt`, MiniMax's
# `ignored_layers`); any other key may change what the tensors mean, so it is refused rather than ignored
_FP8_KEYS = {"quant_method", "weight_block_size", "activation_scheme", "fmt", "scale_fmt", "modules_to_not_convert",
             "ignored_layers", "modules_to_convert", "dequantize", "expert_dtype"}


@dataclass(frozen=True, slots=True)
class Fp8Config:
    """Block-FP8 weights: e4m3 with an fp32 ``weight_scale_inv`` per (block_n x block_k) block, activations
    quantized per token per group of block_k as they enter each GEMM (the "dynamic" scheme)."""

    block: tuple[int, int]
    prequantized: bool  # the checkpoint ships e4m3 weights; else every converted weight is quantized as it loads
    not_converted: tuple[str, ...] = ()  # modules_to_not_convert: these modules keep the checkpoint's dtype

    def converts(self, module: str) -> bool:
        """transformers' rule: a pattern names a module from the start up to a module boundary (also as a regex:
        "model.layers.1" is not "model.layers.11"), or as a suffix."""
        return not any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(p)
                       for p in self.not_converted)


def parse_fp8_config(qc: object, where: str, prequantized: bool) -> Fp8Config:
    """Validate a quantization_config (the checkpoint's, or the `quantization` option's dict form)."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(qc).__name__}")
    supported = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "scale_fmt": "float",
                 "expert_dtype": "fp8", "dequantize": False}
    for key, want in supported.items():  # quant_method first: another method's fields are not ours to list
        got = qc.get(key, want)
        if isinstance(got, str) and isinstance(want, str):
            got = got.lower()
        if got != want:
            raise ValueError(f"{where}.{key} = {qc[key]!r} is not supported (only {want!r}: block-quantized e4m3 "
                             "weights with fp32 weight_scale_inv, activations quantized dynamically per token group)")
    unknown = sorted(set(qc) - _FP8_KEYS)
    if unknown:
        raise ValueError(f"{where} has unsupported field(s) {unknown}; supported: {sorted(_FP8_KEYS)}")
    if qc.get("modules_to_convert"):
        raise ValueError(f"{where}.modules_to_convert is not supported (FP8 embeddings): {qc['modules_to_convert']!r}")
    block = qc.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{where}.weight_block_size must be two positive integers [block_n, block_k], got {block!r}")
    skip = []
    for key in ("modules_to_not_convert", "ignored_layers"):
        names = qc.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}.{key} must be a list of module names, got {names!r}")
        for n in names:
            try:
                re.compile(n)
            except re.error as e:
                raise ValueError(f"{where}.{key} entry {n!r} is not a valid pattern: {e}") from None
        skip += names
    return Fp8Config(block=(block[0], block[1]), prequantized=prequantized, not_converted=tuple(skip))


def derive_quantization(hf_config, family: Family, model_dir: str, requested: str | dict | None) -> Fp8Config | None:
    """The checkpoint's quantization_config (FP8 checkpoints always run in FP8), else the `quantization` option:
    "fp8" (blocks of DEFAULT_FP8_BLOCK) or a quantization_config-style dict (e.g. another weight_block_size)."""
    if requested is not None and requested != "fp8" and not isinstance(requested, dict):
        raise ValueError(f"quantization must be None, 'fp8' or a quantization_config dict, got {requested!r}")
    shipped = getattr(hf_config, "quantization_config", None)  # config.json's dict, as transformers keeps it
    if shipped is not None:
        quant = parse_fp8_config(shipped, f"quantization_config in {os.path.join(model_dir, 'config.json')}", True)
        if isinstance(requested, dict) and parse_fp8_config(requested, "quantization", True) != quant:
            raise ValueError(f"quantization {requested!r} differs from the checkpoint's quantization_config {shipped!r}"
                             " (an FP8 checkpoint runs as it was quantized)")
    elif requested is None:
        return None
    elif requested == "fp8":
        quant = Fp8Config(block=DEFAULT_FP8_BLOCK, prequantized=False)
    else:
        quant = parse_fp8_config(requested, "quantization", False)
    if not family.fp8:
        raise ValueError(f"FP8 is not supported for {family.model_type} (its experts are not SwiGLU experts "
                         "without biases)")
    # the names are the checkpoint's: renamed as its tensors are (Mixtral's block_sparse_moe is our mlp)
    renamed = []
    for name in quant.not_converted:
        for pattern, repl in family.renames_compiled:
            name = pattern.sub(repl, name + ".").removesuffix(".")
        renamed.append(name)
    return replace(quant, not_converted=tuple(renamed))


@dataclass(slots=True)
class ModelConfig:
    """Facts about a checkpoint, derived once from its config.json."""

    model_dir: str
    hf_config: object
    family: Family
    moe_layer_ids: list[int]
    num_experts: int
    top_k: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    quant: Fp8Config | None = None  # block-FP8 weights (a shipped FP8 checkpoint, or quantized as it loads)

    @classmethod
    def from_dir(cls, model_dir: str, quantization: str | dict | None = None) -> ModelConfig:
        c = read_hf_config(model_dir)
        family = get_family(c.model_type)
        eos = c.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        try:
            gen = json.load(open(os.path.join(model_dir, "generation_config.json")))
            g = gen.get("eos_token_id")
            eos = sorted(set(eos) | set([g] if isinstance(g, int) else (g or [])))
        except (OSError, json.JSONDecodeError):
            pass
        return cls(
            model_dir=model_dir,
            hf_config=c,
            family=family,
            moe_layer_ids=[i for i in range(c.num_hidden_layers) if family.is_moe_layer(c, i)],
            num_experts=family.num_experts(c),
            top_k=family.top_k(c),
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            hidden_size=c.hidden_size,
            vocab_size=c.vocab_size,
            max_position_embeddings=getattr(c, "max_position_embeddings", 1 << 20),
            eos_token_ids=eos,
            quant=derive_quantization(c, family, model_dir, quantization),
        )

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def routing_dtype(self) -> np.dtype:
        return routing_dtype(self.num_experts)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    max_num_seqs: int = 256
    max_model_len: int = 4096
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # explicit KV pool size (tests force preemption with a tiny pool)
    enforce_eager: bool = False  # True: no CUDA graphs
    load_format: str = "auto"  # "dummy": random weights, only config.json is read (benchmarks)
    tensor_parallel_size: int = 1  # ranks on one host (one GPU each; gloo processes on CPU)
    # None: as the checkpoint ships (FP8 if its config.json has an fp8 quantization_config); "fp8": quantize a
    # bf16 checkpoint to block-FP8 as it loads; a dict: a quantization_config for that (e.g. weight_block_size)
    quantization: str | dict | None = None
    seed: int = 0
    routing_replay: RoutingReplayConfig = field(default_factory=RoutingReplayConfig)
    model_config: ModelConfig = field(init=False)

    def __post_init__(self) -> None:
        self.routing_replay = RoutingReplayConfig.coerce(self.routing_replay)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}")
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        self.model_config = ModelConfig.from_dir(self.model, self.quantization)
        limit = self.model_config.max_position_embeddings
        if self.max_model_len > limit:  # positions past it are outside what the model was trained on
            log.warning("max_model_len %d is above the model's max_position_embeddings %d: using %d",
                        self.max_model_len, limit, limit)
            self.max_model_len = limit
        self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        tp, c = self.tensor_parallel_size, self.model_config.hf_config
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        if tp == 1:
            return
        if self.device.startswith("cuda") and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs, found {torch.cuda.device_count()}")
        sizes = {"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                 "intermediate_size": getattr(c, "intermediate_size", 0),
                 "moe_intermediate_size": getattr(c, "moe_intermediate_size", 0) or 0}
        fam = self.model_config.family
        if fam.shared:
            sizes["shared expert intermediate size"] = fam.shared_intermediate(c)
        for name, n in sizes.items():
            if n % tp:
                raise ValueError(f"{name} ({n}) is not divisible by tensor_parallel_size ({tp})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cache_dtype(self) -> torch.dtype:
        """Routing cache element type; debug mode stores positions, which need 32 bits."""
        if self.routing_replay.debug:
            return torch.int32
        return torch.uint8 if self.model_config.routing_dtype == np.uint8 else torch.int16
