"""The package's shape, checked from the source: module size, import cycles, private names, and
family names kept inside the one table. Read as text (ast), nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500
FAMILY_NAMES = {"sd1", "sd2", "sdxl"}
FAMILY_TABLE = "minti.loading.families"


def module_name(path: Path) -> str:
    """minti/training/trainer.py -> minti.training.trainer; kernels/geglu.py -> minti.kernels.geglu."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["minti", "kernels"] + parts[1:]
    elif parts[0] == "bench":
        parts = ["bench"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_files() -> dict[str, Path]:
    files = sorted((ROOT / "minti").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return {module_name(p): p for p in files if "__pycache__" not in p.parts}


def bench_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "bench").glob("*.py"))}


MODULES = package_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(current: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package(current) else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement, at any depth:
    a function-level import is as much a dependency as a top-level one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((resolve(name, node), [alias.name for alias in node.names]))
    return found


def edges(name: str, tree: ast.AST) -> set[str]:
    """The minti modules this one imports. `from pkg import sub` depends on pkg (its __init__
    runs and may resolve sub through a lazy __getattr__) and on pkg.sub when that is a module."""
    out = set()
    for target, names in imports_of(name, tree):
        if target in MODULES:
            out.add(target)
        for imported in names:
            if f"{target}.{imported}" in MODULES:
                out.add(f"{target}.{imported}")
    out.discard(name)
    return out


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


TREES = {name: parse(path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_in_the_package_is_over_500_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: c for n, c in long.items() if c > MAX_LINES} == {}


def test_the_package_has_no_import_cycles_counting_function_level_imports():
    graph = {name: edges(name, tree) for name, tree in TREES.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    a = ast.parse("def f():\n    from minti.training import trainer\n")
    b = ast.parse("from minti.loading.pipeline import load\n")
    graph = {"minti.loading.pipeline": edges("minti.loading.pipeline", a),
             "minti.training.trainer": edges("minti.training.trainer", b)}
    assert cycles(graph) == [["minti.loading.pipeline", "minti.training.trainer"]]


def private_uses(name: str, tree: ast.AST) -> list[str]:
    """Private names of other minti modules this module uses: imported (`from m import _x`) or
    reached through a module alias (`m._x`)."""
    found = []
    aliases = {}  # local name -> minti module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES or alias.name.startswith("minti."):
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node) if name in MODULES else (node.module or "")
            if not target.startswith("minti"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:
                    aliases[alias.asname or alias.name] = full
                elif private(alias.name) and target != name:
                    found.append(f"from {target} import {alias.name}")
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
              and isinstance(node.value, ast.Call) and dotted(node.value.func) == "importlib.import_module"
              and node.value.args and isinstance(node.value.args[0], ast.Constant)):
            aliases[node.targets[0].id] = node.value.args[0].value  # fa = importlib.import_module("minti.kernels.x")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain = dotted(node.value)
            if chain is None:
                continue
            head, *rest = chain.split(".")
            module = ".".join([aliases[head]] + rest) if head in aliases else chain
            if module in MODULES and module != name:
                found.append(f"{module}.{node.attr}")
    return found


def private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def test_no_module_uses_a_private_name_of_another_minti_module():
    everything = {**{n: TREES[n] for n in MODULES}, **{n: parse(p) for n, p in bench_files().items()}}
    found = {name: uses for name, tree in everything.items() if (uses := private_uses(name, tree))}
    assert found == {}


def test_the_private_name_check_sees_imports_and_module_attributes():
    tree = ast.parse("import minti.kernels.flash_attention as fa\nfrom minti.training.trainer import _draw\n"
                     "fa._attn_fwd\ngn = importlib.import_module('minti.kernels.geglu')\ngn._geglu_fwd\n")
    assert sorted(private_uses("bench.x", tree)) == ["from minti.training.trainer import _draw",
                                                     "minti.kernels.flash_attention._attn_fwd",
                                                     "minti.kernels.geglu._geglu_fwd"]


def family_name_uses(tree: ast.AST) -> list[int]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in FAMILY_NAMES and id(node) not in docstrings]


def test_family_names_appear_only_in_the_family_table():
    found = {name: lines for name, tree in TREES.items()
             if name != FAMILY_TABLE and (lines := family_name_uses(tree))}
    assert found == {}


@pytest.mark.parametrize("source", ['if family == "sdxl": pass', 'x = {"sd1": 1}', 'f(family="sd2")'])
def test_the_family_name_check_sees_comparisons_keys_and_arguments(source):
    assert family_name_uses(ast.parse(source)) == [1]
