"""The import graph of src/mtlora: no cycle, and the layers stay in order (module- and
function-level imports alike, read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "mtlora") -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (SRC / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                       for n in ast.walk(block)}  # annotations only: no run-time arrow
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import mtlora.x.y` -> the module that exists
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] == package:
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _is_parent_package(a: str, b: str) -> bool:
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycle():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a cycle of ideas
    graph = {k: {v for v in vs if not _is_parent_package(k, v)} for k, vs in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_layers_stay_in_order():
    graph = import_graph()
    high = {"mtlora.config", "mtlora.train", "mtlora.meta", "mtlora.cli", "mtlora.bench", "mtlora.models"}
    for module, imports in graph.items():
        layer = module.split(".")[1] if module.count(".") else ""
        if layer in ("adapters", "data", "objectives"):
            bad = {i for i in imports if i in high or i.startswith("mtlora.bench.")}
            assert not bad, f"{module} imports {sorted(bad)} (a lower layer must not)"
        if module == "mtlora.config":
            bad = {i for i in imports if i.startswith(("mtlora.adapters", "mtlora.objectives"))}
            assert not bad, f"mtlora.config imports {sorted(bad)}"
