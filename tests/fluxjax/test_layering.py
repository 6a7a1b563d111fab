"""The repository's packages depend on each other one way, read from their source (lazy imports
inside functions included), and no module imports itself back through others.

    fluxjax                  the library: imports nothing of the repository
    conversion, organisms    above it (the `python -m conversion` front; the model organisms)
    experiments              above organisms
    flux2ref                 the PyTorch reference builders: above the library, used by tests and benchmarks
    benchmarks, tests        on top
"""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("fluxjax", "conversion", "organisms", "experiments", "flux2ref", "benchmarks", "tests")
# What each top-level folder may import of the repository (besides itself).
ALLOWED = {
    "fluxjax": set(),
    "conversion": {"fluxjax"},
    "organisms": {"fluxjax"},
    "experiments": {"fluxjax", "organisms"},
    "flux2ref": {"fluxjax"},
    "benchmarks": {"fluxjax", "organisms", "experiments", "flux2ref"},
    "tests": {"fluxjax", "conversion", "organisms", "experiments", "flux2ref", "benchmarks"},
}
TEST_HELPERS = ("reference", "text_fixtures")  # tests' own modules, imported by name from tests/


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if package == "tests" and parts[-1] in TEST_HELPERS:
                parts = parts[-1:]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every module name `path` imports, anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:-node.level] if not path.name == "__init__.py" else \
                    module.split(".")[:len(module.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph():
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, name):
            parts = imported.split(".")
            for k in range(len(parts), 0, -1):  # the longest prefix that is a module of the repository
                candidate = ".".join(parts[:k])
                if candidate in modules:
                    targets.add(candidate)
                    break
        edges[name] = targets - {name}
    return modules, edges


def _top(module: str, modules) -> str:
    return "tests" if module in TEST_HELPERS else module.split(".")[0]


def test_packages_import_one_way():
    modules, edges = _graph()
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = _top(source, modules), _top(target, modules)
            if a != b and b not in ALLOWED[a]:
                bad.append(f"{modules[source].relative_to(REPO)} imports {target} ({a} may not import {b})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    """No module reaches itself through the imports of others (package __init__ files aside: they
    re-export their submodules)."""
    modules, edges = _graph()
    edges = {m: {t for t in ts if not modules[t].name == "__init__.py"} for m, ts in edges.items()
             if modules[m].name != "__init__.py"}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """Guards the two tests above: an import inside a function counts, and a relative one resolves."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from experiments import lens\n    from . import sibling\n")
    found = _imports(path, "fluxjax.mod")
    assert "experiments.lens" in found and "fluxjax.sibling" in found


def test_only_the_library_is_installed():
    """pyproject installs `fluxjax` and its subpackages, no generic top-level names."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["fluxjax", "fluxjax.*"], include
    from setuptools import find_packages

    installed = find_packages(str(REPO), include=include)
    assert installed and all(p == "fluxjax" or p.startswith("fluxjax.") for p in installed), installed
    assert os.path.isfile(REPO / "fluxjax" / "conversion" / "__init__.py")
