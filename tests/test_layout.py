"""The project's layout holds: imports follow the pipeline, no module imports itself back, files stay short, and
committed results name no machine's directories.

Imports are read with `ast` (nothing is imported), at module level and inside functions alike: a lazy import is
still a dependency.  The pipeline (DESIGN.md section 2) runs exporter -> graphs -> calib, with runtime at the
bottom and demo at the top; `ALLOWED` says which other packages each one may import.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "graphs", "plugins", "calib", "runtime", "demo", "bench")
# generated under bench/ by the benchmarks (artifacts, checkpoints), never source
GENERATED = {"work", "checkpoints", "__pycache__"}
MAX_LINES = 500

# package -> the other packages it may import.  runtime -> plugins: the TensorRT backend registers the plugins
# (runtime/trt_backend.py, lazily); nothing below runtime exists, so that is the one exception to "runtime is lowest".
ALLOWED = {
    "runtime": {"plugins"},
    "plugins": {"runtime"},
    "exporter": {"runtime", "plugins"},
    "graphs": {"exporter", "plugins", "runtime"},
    "calib": {"graphs", "exporter", "plugins", "runtime"},
    "demo": {"calib", "graphs", "exporter", "plugins", "runtime"},
    "bench": set(PACKAGES) - {"bench"},
}


def _sources() -> dict[str, Path]:
    """Module name -> file for every .py file of the project's packages (a package by its own name)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if GENERATED & set(rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


SOURCES = _sources()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (``graphs.ort.qdq.matmul_nbits`` -> ``graphs.ort.qdq``)."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[int, str, str]]:
    """(line, imported project module, the statement) for every import of ``module``, inside functions too."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = {}  # (line, target) -> statement: one entry however many names a statement imports from a module
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package ``level - 1`` above this module's
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found[node.lineno, target] = ast.unparse(node)
    return [(line, target, stmt) for (line, target), stmt in found.items()]


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := dfs(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_the_walk_sees_every_package():
    for pkg in PACKAGES:
        assert any(m == pkg or m.startswith(pkg + ".") for m in SOURCES), f"no module of {pkg}/ found under {ROOT}"
    assert "graphs.ort.lower" in SOURCES and "runtime.manifest" in SOURCES


def test_no_import_cycle():
    """No module imports itself back through others, counting the imports inside functions: a lazy import hides
    a circle from the interpreter, not from the reader."""
    edges = {m: set() for m in SOURCES}
    where = {}
    for module, path in SOURCES.items():
        for line, target, stmt in _imports(module, path):
            edges[module].add(target)
            where.setdefault((module, target), f"{path.relative_to(ROOT)}:{line}: {stmt}")
    cycles = []
    while (cycle := _cycle(edges)) is not None and len(cycles) < 20:
        cycles.append(f"{' -> '.join(cycle)}:\n    " + "\n    ".join(where[a, b] for a, b in zip(cycle, cycle[1:])))
        edges[cycle[-2]].discard(cycle[-1])  # to find the next one
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_imports_follow_the_pipeline():
    """exporter -> graphs -> calib, runtime at the bottom, demo on top, bench above all (`ALLOWED`)."""
    wrong = []
    for module, path in SOURCES.items():
        pkg = module.split(".")[0]
        for line, target, stmt in _imports(module, path):
            other = target.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: `{stmt}`: {pkg} must not import {other} "
                             f"(it may import {', '.join(sorted(ALLOWED[pkg])) or 'nothing of the project'})")
    assert not wrong, "imports against the pipeline:\n  " + "\n  ".join(wrong)


def test_no_long_source_file():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in SOURCES.values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"source files over {MAX_LINES} lines (split them by job):\n  " + "\n  ".join(long)


# an absolute path where a path starts: "/work/x", "~/x", "C:\x"; not "tok/s" or "a / b"
_ABSOLUTE = re.compile(r"(?:^|(?<=[\s(\[='\",]))(?:/|~/|[A-Za-z]:\\)[\w.-]+")


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("*.json")), ids=lambda p: p.name)
def test_results_name_no_absolute_path(path):
    """Committed results record paths relative to the repository (`bench.paths`), never where a machine keeps it."""
    bad = [s for s in _strings(json.loads(path.read_text())) if _ABSOLUTE.search(s)]
    assert not bad, f"{path.relative_to(ROOT)}: absolute paths in {len(bad)} strings, e.g. {bad[0][:200]!r}"


# third-party packages only one module may import (lazily): module -> the one allowed importer
CONFINED = {"ray": "runtime.serve.ray_app"}


@pytest.mark.parametrize("package", sorted(CONFINED))
def test_confined_imports(package):
    """Ray is imported by `runtime.serve.ray_app` alone: the runtime and the plain server never need it."""
    wrong = []
    for module, path in SOURCES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if module != CONFINED[package] and any(n == package or n.startswith(package + ".") for n in names):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not wrong, f"only {CONFINED[package]} may import {package}:\n  " + "\n  ".join(wrong)
