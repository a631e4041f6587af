"""The package dependency rules, read from the source's imports (not from running it):

    contracts ← preparation ← training ← indexer ← retrieval ← app

An arrow runs one way only: a package imports only those to its left. Retrieval's one use of
training is the optional SavedModel user tower (imported when an artifact needs it), and no
module imports another package's private names. And contracts imports with TensorFlow and
Faiss unimportable: the serving install and every stage depend on it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("contracts", "preparation", "training", "indexer", "retrieval", "app")
HEAVY = ("tensorflow", "tf_keras", "tensorflow_recommenders", "faiss", "pyspark")
# (importing module, imported module): allowed exceptions to ORDER, each with its reason
ALLOWED_UPWARD = {
    ("retrieval.pair", "training.saved_model_tower"): "optional SavedModel tower, lazily",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ORDER:
        for path in (ROOT / package).rglob("*.py"):
            if "v1" in path.relative_to(ROOT).parts:  # generated gRPC stubs
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path) -> list[tuple[str, tuple[str, ...], bool]]:
    """(module, names taken, at module level?) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, (), id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, tuple(a.name for a in node.names), id(node) in top))
    return out


MODULES = _modules()
EDGES = {name: _imports(path) for name, path in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[0]


def test_each_package_imports_only_the_packages_before_it():
    wrong = []
    for importer, imports in EDGES.items():
        rank = ORDER.index(_package(importer))
        for module, _, _ in imports:
            if _package(module) in ORDER and ORDER.index(_package(module)) > rank:
                if (importer, module) not in ALLOWED_UPWARD:
                    wrong.append(f"{importer} imports {module}")
    assert wrong == []


def test_no_private_name_is_imported_across_packages():
    wrong = [f"{importer} takes {name} from {module}"
             for importer, imports in EDGES.items()
             for module, names, _ in imports
             if _package(module) in ORDER and _package(module) != _package(importer)
             for name in names if name.startswith("_")]
    assert wrong == []


def test_contracts_imports_no_heavy_framework_even_lazily():
    wrong = [f"{importer} imports {module}"
             for importer, imports in EDGES.items() if _package(importer) == "contracts"
             for module, _, _ in imports if _package(module) in HEAVY + ("grpc",)]
    assert wrong == []


def test_no_import_cycle_between_modules():
    graph = {m: {i for i, _, _ in imports if i in MODULES and i != m}
             for m, imports in EDGES.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_rules_catch_an_upward_import(tmp_path):
    """The check is not vacuous: a module of training that imports retrieval is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from retrieval.server import serve\n")
    [(module, names, top)] = _imports(bad)
    assert ORDER.index(_package(module)) > ORDER.index("training") and top


@pytest.mark.parametrize("package", ["contracts"])
def test_contracts_imports_with_tensorflow_and_faiss_blocked(package):
    blocked = ", ".join(repr(h) for h in HEAVY)
    code = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ({blocked}):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import {package}
for info in pkgutil.walk_packages({package}.__path__, '{package}.'):
    importlib.import_module(info.name)
assert not any(m.split('.')[0] in ({blocked}) for m in sys.modules)
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
