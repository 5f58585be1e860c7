"""OpenAI-compatible rollout server (`routereplay serve`): routing returned in responses and stored.

``ServerOptions`` is importable without the server's dependencies (the CLI builds its flags from it);
the rest loads on first use."""

from routereplay.server.options import ServerOptions

__all__ = ["ApiError", "EngineThread", "ServerOptions", "create_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from routereplay.server import app

        return getattr(app, name)
    raise AttributeError(name)
