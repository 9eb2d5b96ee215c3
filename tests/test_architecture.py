"""The package's layers: data flows one way, so no module imports a higher layer and no imports
form a cycle. The graph is read from the source (every ``import`` statement, also those inside
functions), so the test sees what a reader sees."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_te"

#: Lowest first: a module may import its own layer and the layers before it.
LAYERS = ("errors", "io", "data", "networks", "features", "metrics", "evaluation", "ranking", "risk",
          "classification", "training", "demo", "cli")


def _module_name(path: Path) -> str:
    parts = ("nnunet_te", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")[:len(module.split(".")) - node.level + is_package]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # "from package import module" imports the module; "from module import name" the module
        return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
    return []


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports}, over every module of the package."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets |= {name for name in _imported(node, module, path.name == "__init__.py") if name in paths}
        graph[module] = targets - {module}
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if layer(a) in rank and layer(b) in rank and rank[layer(b)] > rank[layer(a)])


def test_every_module_belongs_to_a_layer():
    graph = import_graph()
    assert len(graph) > len(LAYERS)
    outside = sorted(m for m in graph if m != "nnunet_te" and layer(m) not in LAYERS)
    assert not outside, f"modules outside every layer (add the layer to LAYERS in order): {outside}"


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_no_import_from_a_lower_to_a_higher_layer():
    assert upward_imports(import_graph()) == []


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, None),
])
def test_the_cycle_check_finds_a_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_layer_check_finds_an_upward_import():
    graph = {"nnunet_te.metrics.gbc": {"nnunet_te.ranking.rank"}, "nnunet_te.ranking.rank": {"nnunet_te.io.files"}}
    assert upward_imports(graph) == [("nnunet_te.metrics.gbc", "nnunet_te.ranking.rank")]
