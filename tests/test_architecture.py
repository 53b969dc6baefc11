"""The package's shape, checked: floors that imports only go down, no import cycles, a small top level, short
functions. These are the facts the layout in ../shared/DESIGN.md promises; a change that breaks one fails here."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxrbench"

#: subpackage (or top-level module) -> floor; an import may only point to the same or a lower floor.
FLOORS: dict[str, int] = {
    "__init__": 9, "_types": 1, "_threads": 1, "labels": 1, "io": 1, "preprocess": 1,
    "data": 2, "models": 2, "evaluation": 2,
    "explain": 3, "ood": 3,
    "inference": 4,
    "train": 5, "hybrid": 5,
    "export": 6,
    "plots": 7,
    "app": 8, "cli": 8,
}
#: what may sit directly in cxrbench/ besides the floors above
TOP_LEVEL_EXTRA = {"py.typed"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    assert len(out) > 50, f"found only {len(out)} modules under {PACKAGE}"
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the cxrbench modules it imports anywhere in its body (lazy imports count too)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("cxrbench"):
                    continue
                for alias in node.names:  # `from pkg import module` is an import of that module
                    sub = f"{target}.{alias.name}"
                    graph[name].add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("cxrbench"))
    return graph


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_entry_of_the_package_has_a_floor_and_the_top_level_is_small():
    entries = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    unknown = entries - set(FLOORS) - TOP_LEVEL_EXTRA
    assert not unknown, f"cxrbench/ entries without a floor in the layout: {sorted(unknown)}"
    public = {e for e in entries if not e.startswith("_")} - TOP_LEVEL_EXTRA
    assert len(public) <= 16, f"{len(public)} public entries directly in cxrbench/: {sorted(public)}"


def test_imports_point_down_the_floors_never_up():
    modules = _modules()
    upward = []
    for module, targets in _imports(modules).items():
        for target in targets:
            if target == "cxrbench":  # `from cxrbench import __version__`; the lazy API itself is the top floor
                continue
            src, dst = _group(module), _group(target)
            if FLOORS[dst] > FLOORS[src]:
                upward.append(f"{module} (floor {FLOORS[src]}) imports {target} (floor {FLOORS[dst]})")
    assert not upward, "imports running up the floors:\n" + "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules_or_subpackages():
    graph = _imports(_modules())
    graph.pop("cxrbench", None)  # the lazy top-level API points at everything by design
    for targets in graph.values():
        targets.discard("cxrbench")
    assert not _cycles(graph), f"module import cycles: {_cycles(graph)}"
    groups: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        groups[_group(module)].update(_group(t) for t in targets if _group(t) != _group(module))
    assert not _cycles(groups), f"subpackage import cycles: {_cycles(groups)}"


def _function_lengths() -> list[tuple[int, str]]:
    out = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                start = node.lineno
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                        first.value.value, str):
                    start += first.end_lineno - first.lineno + 1  # the docstring does not count
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                out.append((node.end_lineno - start + 1, where))
    return out


def test_no_function_is_longer_than_sixty_lines():
    long = sorted((n, where) for n, where in _function_lengths() if n > MAX_FUNCTION_LINES)
    assert not long, "functions over 60 lines (docstring excluded):\n" + "\n".join(f"{n:4d} {w}" for n, w in long)


@pytest.mark.parametrize("check", [_cycles])
def test_the_cycle_finder_finds_a_cycle(check):
    assert check({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert check({"a": {"b"}, "b": set()}) == []


def test_the_lazy_api_lists_exactly_what_it_offers():
    import cxrbench

    assert set(cxrbench.__all__) == {"__version__", *cxrbench._LAZY}
    for name in cxrbench._LAZY:
        assert getattr(cxrbench, name) is not None
