"""routereplay: Rollout Routing Replay (R3) for Mixture-of-Experts RL."""

from routereplay.config import EngineConfig, RoutingReplayConfig
from routereplay.engine.llm import LLM
from routereplay.outputs import CompletionOutput, RequestOutput
from routereplay.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RoutingReplayConfig", "EngineConfig", "RequestOutput", "CompletionOutput"]
