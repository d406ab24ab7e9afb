"""The import graph, read from the source with `ast` (every import, at module level or inside a
function: a lazy import is still a dependency). The layers are sae_kernels < sae < eval < train.py: a
module imports only from its own layer or lower ones, and no modules import each other in a circle.
(sae_kernels lives in the folder kernels/sae_kernels/; tests/test_import_names.py checks its name.)"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"sae_kernels": 0, "sae": 1, "eval": 2, "train": 3}
# The folder that holds each top-level package (the one that sys.path would name).
SOURCE_ROOTS = {"sae_kernels": ROOT / "kernels", "sae": ROOT, "eval": ROOT}


def module_name(path: Path, source_root: Path) -> str:
    parts = list(path.relative_to(source_root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {module_name(path, root): path for package, root in SOURCE_ROOTS.items()
               for path in (root / package).rglob("*.py")}
    return {**modules, "train": ROOT / "train.py"}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports: `from X import y` is X.y where that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target.split(".")[0] in LAYERS)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"sae.trainer", "sae.optim", "sae_kernels.ops", "eval.evaluate", "train"} <= set(graph)
    assert "sae.optim" in graph["sae.trainer"] and "sae_kernels" in graph["sae.model"]
    assert "eval" in graph["train"]  # `from eval import training_evaluator`


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
                    if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]])
    assert not upward, "imports that run upward (sae_kernels < sae < eval < train.py): " + ", ".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, None),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle
