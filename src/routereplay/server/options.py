"""What a deployment sets about the service itself (not the engine): limits on what one request may ask,
and the lock-down options. ``routereplay serve`` flags map one to one onto these fields."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ServerOptions:
    # Bearer token every endpoint but /health requires (vLLM's --api-key); None: open, as vLLM and SGLang.
    api_key: str | None = None
    # /update_weights_from_disk loads only from directories under these; empty: any directory (SGLang's default).
    weight_dirs: tuple[str, ...] = ()
    # A weight-sync group that has not formed by then fails, on the server and (through its 400) the trainer.
    weight_group_timeout_s: float = 60.0
    max_request_bytes: int = 32 << 20  # larger bodies: 413 before they are read
    request_body_timeout_s: float = 10.0  # a body not received by then: 408 (a client that stalls mid-body)
    max_prompts_per_request: int = 1024  # a batch of prompts in one request (OpenAI completions, /generate)
    # A text prompt longer than this many characters per token of max_model_len cannot fit: 400 before
    # tokenizing (a 10 MB prompt would hold a CPU for seconds to be refused anyway).
    max_chars_per_token: int = 32
    shutdown_timeout_s: float = 5.0  # on SIGTERM: requests still running then are failed, the store flushed
    # What /server_info reports as SGLang's enable_memory_saver (slime checks it equals its offload_rollout);
    # /release_memory_occupation works either way.
    enable_memory_saver: bool = False

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        for name in ("weight_group_timeout_s", "request_body_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_request_bytes", "max_prompts_per_request", "max_chars_per_token"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # Resolved once: a symlink made later inside an allowed directory cannot lead out of it.
        object.__setattr__(self, "weight_dirs", tuple(os.path.realpath(d) for d in self.weight_dirs))

    def weight_dir_allowed(self, path: str) -> bool:
        if not self.weight_dirs:
            return True
        real = os.path.realpath(path)
        return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.weight_dirs)
