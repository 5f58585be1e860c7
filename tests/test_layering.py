"""The arrows of the package point one way: layers, models and kernels never import the engine or the
server, and nothing outside ``engine/`` reaches into the engine's internals (its scheduler, model runner,
live requests or store writer): it uses LLMEngine's public methods."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "routereplay"
LOWER = ("layers", "models", "kernels")  # below the engine
ENGINE_INTERNAL_MODULES = {f"routereplay.engine.{m}" for m in
                           ("scheduler", "sequence", "block_manager", "model_runner", "workers")}
ENGINE_INTERNAL_ATTRS = {"scheduler", "runner", "requests", "store_writer"}


def _modules(*parts: str) -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] in parts)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def _ends_in_engine(node: ast.AST) -> bool:
    """``engine``, ``self.engine``, ``llm.engine``: an expression naming an LLMEngine by convention."""
    return (isinstance(node, ast.Name) and node.id == "engine") or (
        isinstance(node, ast.Attribute) and node.attr == "engine")


def _violations(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(PKG)
        for line, module in _imports(tree):
            if module in ENGINE_INTERNAL_MODULES:
                bad.append(f"{rel}:{line} imports {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNAL_ATTRS and _ends_in_engine(node.value):
                bad.append(f"{rel}:{node.lineno} reads engine.{node.attr}")
    return bad


def test_layers_models_and_kernels_never_import_the_engine_or_the_server() -> None:
    bad = [f"{p.relative_to(PKG)}:{line} imports {m}" for p in _modules(*LOWER)
           for line, m in _imports(ast.parse(p.read_text()))
           if m.startswith(("routereplay.engine", "routereplay.server"))]
    assert not bad, bad


def test_nothing_outside_the_engine_reads_its_internals() -> None:
    outside = [p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] != "engine"]
    bad = _violations(outside)
    assert not bad, bad


@pytest.mark.parametrize("source, expect", [
    ("from routereplay.engine.scheduler import Scheduler\n", "imports routereplay.engine.scheduler"),
    ("def f(engine):\n    return engine.scheduler.waiting\n", "reads engine.scheduler"),
    ("class S:\n    def f(self):\n        return self.engine.runner.model\n", "reads engine.runner"),
])
def test_the_rule_catches_a_violation(tmp_path: Path, source: str, expect: str) -> None:
    path = PKG / "_probe_layering.py"
    try:
        path.write_text(source)
        assert any(expect in v for v in _violations([path]))
    finally:
        path.unlink()
