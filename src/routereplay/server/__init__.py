"""OpenAI-compatible rollout server (`routereplay serve`): routing returned in responses and stored."""

from routereplay.server.app import ApiError, EngineThread, create_app, serve

__all__ = ["ApiError", "EngineThread", "create_app", "serve"]
