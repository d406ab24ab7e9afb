"""sae/distributed.py keeps only what the project calls: every function in it is imported by another
module of the project, or used by one that is (an uncalled copy of a ShardLayout collective drifts
from the one training uses)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "sae" / "distributed.py"


def project_files() -> list[Path]:
    paths = [*ROOT.glob("sae/**/*.py"), *ROOT.glob("eval/**/*.py"), *ROOT.glob("kernels/**/*.py"),
             *ROOT.glob("tests/**/*.py"), ROOT / "train.py"]
    return [path for path in paths if path != MODULE]


def imported_from_distributed(path: Path) -> set[str]:
    """Names `path` imports from sae.distributed (`from sae.distributed import x`, `from .distributed ...`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module == "sae.distributed"
                                                 or (node.level > 0 and node.module == "distributed")):
            names.update(alias.name for alias in node.names)
    return names


def test_every_function_in_sae_distributed_has_a_caller():
    tree = ast.parse(MODULE.read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "init_distributed" in functions  # the check sees the module
    used = set().union(*(imported_from_distributed(path) for path in project_files()))
    # and what the used functions (and the module's classes) call in turn
    pending = [functions[name] for name in used if name in functions]
    pending += [node for node in tree.body if isinstance(node, ast.ClassDef)]
    while pending:
        for name in {n.id for n in ast.walk(pending.pop()) if isinstance(n, ast.Name)} & set(functions) - used:
            used.add(name)
            pending.append(functions[name])
    uncalled = sorted(set(functions) - used)
    assert not uncalled, f"functions in sae/distributed.py that nothing calls: {uncalled}"
