"""Every option, validated, and every model fact derived, in one place.

`ModelConfig` states what the engine and the routing capture need to know about a checkpoint
(`moe_layer_ids`, `num_experts`, `top_k`, the routing dtype); nothing else recomputes these.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields

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

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelConfig:
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
        self.model_config = ModelConfig.from_dir(self.model)
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
