"""The house by role (docs/architecture.md): no import cycle in src/, imports only down the
floors, `moe/` free of Lightning, Hydra and OmegaConf, files of a readable size, and the
architecture page naming only packages that exist (and every one that does).

Imports are read with `ast`, module-level and inside functions alike: a late import is a
dependency all the same."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .conftest import ROOT

SRC = ROOT / "src"

# Lowest first: a module may import from its own floor or below (docs/architecture.md).
FLOORS = {
    "moelab.moe": 0,
    "moelab.models": 1, "moelab.data": 1, "moelab.parallel": 1,
    "moelab.tasks": 2, "moelab.callbacks": 2,
    "moelab.run": 3,
    "moelab.sweeps": 4, "moelab.use": 4, "moelab.studies": 4, "moelab.bench": 4,
}
TOP = 5  # moelab/__init__.py (moelab.load), the moelab.report shim, hydra_plugins


def modules(src: Path) -> dict[str, Path]:
    """Dotted module name → file, packages by their __init__.py."""
    found = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(src: Path) -> dict[str, set[str]]:
    """module → the modules of `src` it imports (anywhere in the file). `from a.b import c`
    counts as importing a.b.c when that is a module, else a.b; the implicit import of a
    parent package is not counted."""
    mods = modules(src)
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def floor(module: str) -> int:
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return FLOORS[prefix]
    return TOP


def test_no_import_cycle_in_src():
    assert cycles(import_graph(SRC)) == []


def test_the_cycle_check_finds_a_planted_cycle_and_a_function_level_one(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import g\n")
    (package / "b.py").write_text("def g():\n    from pkg import c\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "d.py").write_text("import pkg.a\n")
    assert cycles(import_graph(tmp_path)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_imports_point_down_the_floors():
    upward = [f"{module} imports {target}" for module, targets in import_graph(SRC).items()
              for target in sorted(targets) if floor(target) > floor(module)]
    assert upward == []


def test_moe_imports_no_lightning_hydra_or_omegaconf():
    banned = {"lightning", "pytorch_lightning", "hydra", "omegaconf"}
    found = []
    for path in (SRC / "moelab" / "moe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(SRC)}: {n}" for n in names if n.split(".")[0] in banned]
    assert found == []


def test_files_stay_readable_in_size():
    long_modules = [f"{p.relative_to(ROOT)} ({n})" for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500]
    long_scripts = [f"{p.relative_to(ROOT)} ({n})" for p in (ROOT / "scripts").glob("*.py")
                    if (n := len(p.read_text().splitlines())) > 200]
    assert long_modules == [] and long_scripts == []


def test_the_architecture_page_names_every_package_and_only_those():
    page = (ROOT / "docs" / "architecture.md").read_text()
    tree = page.split("```")[1]
    named = set(re.findall(r"^\s+(\w+)/", tree, re.MULTILINE))  # the package lines under src/moelab/
    packages = {p.parent.name for p in (SRC / "moelab").rglob("__init__.py") if p.parent != SRC / "moelab"}
    assert named == packages
    for path in re.findall(r"`((?:moe|models|data|parallel|tasks|callbacks|run|sweeps|use|studies|bench)/[\w/]+\.py)`", page):
        assert (SRC / "moelab" / path).is_file(), path
    floors = page.split("Floors, lowest first:")[1].split(". ")[0]
    assert set(re.findall(r"`(\w+)`", floors)) == {name.split(".")[1] for name in FLOORS}
