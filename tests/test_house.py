"""The house rules a machine can check: ruff and mypy clean (so the README's one test
command checks them too), and imports that go down the layers of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "proxy", "tests", "bench", "tools"],
        ["ruff", "format", "--check", "proxy", "tests", "bench", "tools"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_clean(command: list[str]):
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


# The packages of proxy/, lowest first (docs/ARCHITECTURE.md, "Layers"): a module imports
# only from its own package or one listed before it. Top-level modules are placed by name.
LAYERS = [
    "base",  # answer.py, errors.py, pdeathsig.py
    "redis",
    "config",
    "observe",
    "limits",
    "routing",
    "upstream",
    "engines",
    "services",  # services.py, readiness.py: the app's shared state, typed
    "call",
    "http",
    "top",  # app.py, server.py, cli.py, usage_cli.py, __main__.py
]
TOP_LEVEL = {
    "answer": "base", "errors": "base", "pdeathsig": "base",
    "services": "services", "readiness": "services",
}  # fmt: skip
# Packages below the servers that must not know aiohttp: only http/ (and the app, the
# services holder's key, the engines' own HTTP client) may.
NO_AIOHTTP = {"base", "redis", "config", "observe", "limits", "routing", "upstream", "call"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__")] = path
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (ROOT / "proxy" / parts[-1]).is_dir():
        return parts[1]
    return TOP_LEVEL.get(parts[-1], "top")


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The proxy modules ``path`` imports when it runs (not under TYPE_CHECKING)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for node in ast.walk(guard)
    }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found.update(subs & modules or {node.module})
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _runtime_imports(path, set(modules)) for name, path in modules.items()}


def test_every_import_goes_down_the_layers():
    upward = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module))
    ]
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_through_others():
    graph = _graph()
    cycles = []
    for start in graph:
        seen, stack = set(), [(start, [start])]
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    cycles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert not cycles, "\n".join(sorted(set(cycles)))


def _third_party(path: Path) -> set[str]:
    """The top-level packages a module imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_lower_packages_do_not_know_aiohttp():
    offenders = [
        module
        for module, path in _modules().items()
        if _layer(module) in NO_AIOHTTP and "aiohttp" in _third_party(path)
    ]
    assert not offenders, offenders


def test_every_top_level_module_has_a_layer_and_every_package_one_too():
    packages = {p.name for p in (ROOT / "proxy").iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), packages - set(LAYERS)
    assert set(TOP_LEVEL.values()) <= set(LAYERS)


def test_redis_is_reached_through_the_proxys_own_client_only():
    """redis-py is the tests' view of Redis, not the proxy's (docs/ARCHITECTURE.md, "Redis")."""
    offenders = [module for module, path in _modules().items() if "redis" in _third_party(path)]
    assert not offenders, offenders
