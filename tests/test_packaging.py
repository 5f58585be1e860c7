"""Every third-party module that routereplay imports is a declared dependency (pyproject.toml), so
the README's plain ``pip install -e .`` runs the server, the CLI and the examples' server side.

Imports are read with ``ast`` (module- and function-level alike), mapped to distributions with
``importlib.metadata.packages_distributions()`` and checked against pyproject.toml itself, not the
installed metadata: a dependency that only happens to be installed here (as a test extra) fails.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent

# Imported on purpose without being a dependency: each import must sit under a guard (try/if).
OPTIONAL = {
    # GPU kernels: CUDA builds of torch bring triton; CPU builds have none, and the kernels import it
    # inside ``try: ... except Exception`` (attention.py, fused.py) or ``if HAS_TRITON:`` (moe.py).
    "triton": "comes with CUDA builds of torch",
    "trl": "the trl extra; routereplay.integrations.trl imports it under a guard",
}

# Which extras, beyond the runtime dependencies, each group of files may import from.
FILES = {
    "src/routereplay": (),
    "examples/server_loop.py": (),  # the base install runs it (plain HTTP through httpx)
    "tests": ("test",),
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def _pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def _declared(project: dict, extras: tuple[str, ...]) -> set[str]:
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {_requirement_name(r) for r in reqs}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded: inside a try or an if) for every absolute import in ``path``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name.split(".")[0], node.lineno, guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, guarded))
        inner = guarded or isinstance(node, (ast.Try, ast.If)) or type(node).__name__ == "TryStar"
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _files(where: str) -> list[Path]:
    path = ROOT / where
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _undeclared(where: str, extras: tuple[str, ...], project: dict) -> list[str]:
    declared = _declared(project, extras)
    local = {"routereplay", "tests", "benchmarks"}  # this project's own packages
    dists = importlib.metadata.packages_distributions()
    problems = []
    for path in _files(where):
        for module, line, guarded in _imports(path):
            if module in sys.stdlib_module_names or module in local or module == "__future__":
                continue
            at = f"{path.relative_to(ROOT)}:{line}: {module}"
            if module in OPTIONAL:
                if not guarded:
                    problems.append(f"{at} is optional ({OPTIONAL[module]}) but imported without a guard")
                continue
            names = {_norm(d) for d in dists.get(module, ())}
            if not names:
                problems.append(f"{at} is not installed: declare its distribution or add it to OPTIONAL")
            elif not names & declared:
                problems.append(f"{at} (distribution {', '.join(sorted(names))}) is not declared in pyproject.toml "
                                f"[project] dependencies{' or extras ' + ', '.join(extras) if extras else ''}")
    return problems


@pytest.mark.parametrize("where", list(FILES))
def test_every_import_is_a_declared_dependency(where: str) -> None:
    problems = _undeclared(where, FILES[where], _pyproject())
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_missing_dependency() -> None:
    """Without httpx among the dependencies (as before issue 15) the server's weight sync is flagged."""
    project = _pyproject()
    project = {**project, "dependencies": [r for r in project["dependencies"] if _requirement_name(r) != "httpx"]}
    problems = _undeclared("src/routereplay", (), project)
    flagged = [p for p in problems if "weight_sync.py" in p and ": httpx (distribution httpx) is not declared" in p]
    assert flagged, problems


def test_extras_for_the_client_and_the_tests() -> None:
    project = _pyproject()
    assert "openai" in _declared(project, ("client",)) - _declared(project, ())
    assert {"openai", "pytest", "ruff"} <= _declared(project, ("test",))
    assert project["scripts"]["routereplay"] == "routereplay.cli:main"
