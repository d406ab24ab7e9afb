"""The "stdlib-docs" corpus: English text that every Python installation carries.

Documents are the module, class and function docstrings of the standard library, read by parsing
the source files with `ast` (never by importing them: importing some stdlib modules has side
effects, e.g. `antigravity` opens a browser and `this` prints), plus the reference-manual topics
that `pydoc` ships in `pydoc_data/topics.py`.

The corpus is deterministic: files are walked in sorted order, documents keep a stable order, and
the train/validation/test split is decided by a hash of each document's text (`sae.splits`), so the
same Python gives byte-identical `train.jsonl`, `validation.jsonl` and `test.jsonl`.

Command line: `python -m sae.embedded.corpus OUT_DIR` builds the corpus and prints its size.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..splits import SPLITS, document_split
from . import CORPUS_NAME

# Bump when the extraction or split rules change, so cached corpora from older code are rebuilt.
FORMAT_VERSION = 2

MIN_DOC_CHARS = 40
"""Docstrings shorter than this ("Return self.", "Close the file.") are mostly noise."""

MAX_TOPIC_CHARS = 4000
"""Reference topics longer than this are split into groups of whole paragraphs, so a few huge
topics (the longest is ~60k characters) do not decide the splits on their own."""

# Directories that hold tests, demos or third-party code rather than library documentation.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo",
     "__pycache__", "lib-dynload"}
)

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _clean(text: str) -> str:
    """Normalise whitespace: no trailing spaces, at most one blank line in a row, no edge blanks."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def _source_files(root: Path) -> Iterator[Path]:
    """All `.py` files under `root` that are library code, in a stable (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place both fixes the walk order and lets us prune skipped directories.
        # `config-3.x-...` holds build files for embedding Python, not library modules.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _parse(path: Path) -> ast.Module | None:
    """Parse one source file, or return None if it is not valid Python for this interpreter."""
    try:
        source = path.read_bytes()  # bytes, so ast honours any coding cookie
        with warnings.catch_warnings():
            # Invalid escape sequences in old docstrings warn; they are harmless here.
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """The docstrings of a module and of all its classes and functions, in source order."""
    nodes = [n for n in ast.walk(tree) if isinstance(n, _DOC_NODES)]
    # ast.walk is breadth-first; sorting by position gives reading order (the module comes first).
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", -1)))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield _clean(doc)


def docstring_documents(root: Path | None = None) -> Iterator[str]:
    """Every docstring of the standard library under `root`, one document each."""
    for path in _source_files(root or stdlib_dir()):
        tree = _parse(path)
        if tree is not None:
            yield from _docstrings(tree)


def _topics_dict(root: Path) -> dict[str, str]:
    """The `topics` dict of `pydoc_data/topics.py`, read with ast (the file is one big literal)."""
    tree = _parse(root / "pydoc_data" / "topics.py")
    for node in tree.body if tree is not None else []:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "topics" and node.value is not None:
            value = ast.literal_eval(node.value)
            if isinstance(value, dict):
                return value
    return {}  # a Python built without pydoc_data: the docstrings alone still make a corpus


def _paragraph_groups(text: str, max_chars: int) -> Iterator[str]:
    """Split `text` at blank lines into consecutive groups of at most ~`max_chars` characters."""
    group: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if group and size + len(paragraph) > max_chars:
            yield "\n\n".join(group)
            group, size = [], 0
        group.append(paragraph)
        size += len(paragraph) + 2
    if group:
        yield "\n\n".join(group)


def topic_documents(root: Path | None = None, max_chars: int = MAX_TOPIC_CHARS) -> Iterator[str]:
    """The pydoc reference topics (sorted by name), each one document or a few paragraph groups."""
    topics = _topics_dict(root or stdlib_dir())
    for name in sorted(topics):
        yield from _paragraph_groups(_clean(topics[name]), max_chars)


def _unique_long(docs: Iterable[str], min_chars: int) -> Iterator[str]:
    """Drop tiny documents and exact duplicates (e.g. `_pyio` repeats `io`), keeping first seen."""
    seen: set[str] = set()
    for doc in docs:
        if len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            yield doc


def collect_documents(root: Path | None = None) -> list[str]:
    """All corpus documents in their stable order: docstrings first, then reference topics."""
    root = root or stdlib_dir()
    return list(
        _unique_long(
            (*docstring_documents(root), *topic_documents(root)), MIN_DOC_CHARS
        )
    )


def _write_jsonl_atomic(path: Path, docs: list[str]) -> None:
    """Write one {"text": ...} object per line, via a temp file so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _manifest_header() -> dict[str, object]:
    """What a cached corpus must have been built with to be reused."""
    return {"corpus": CORPUS_NAME, "format_version": FORMAT_VERSION, "python": sys.version}


def _is_up_to_date(paths: dict[str, Path], manifest_path: Path) -> bool:
    """True when every split exists and matches a manifest written by this Python and this code."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in _manifest_header().items()):
        return False
    # Counting lines is cheap next to re-parsing the stdlib and catches truncated/edited files.
    return all(
        p.exists() and _count_lines(p) == manifest.get("documents", {}).get(split)
        for split, p in paths.items()
    )


def build_corpus(out_dir: str | Path) -> dict[str, Path]:
    """Write `train.jsonl`, `validation.jsonl` and `test.jsonl` under `out_dir`; return {split: path}.

    Skips the work when `out_dir` already holds a corpus built by this Python version (checked
    through `manifest.json`, which also records document and character counts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    manifest_path = out / "manifest.json"
    if _is_up_to_date(paths, manifest_path):
        return paths

    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for doc in collect_documents():
        splits[document_split(doc)].append(doc)
    for split, docs in splits.items():
        _write_jsonl_atomic(paths[split], docs)

    manifest = {
        **_manifest_header(),
        "stdlib": str(stdlib_dir()),
        "documents": {split: len(docs) for split, docs in splits.items()},
        "characters": {split: sum(map(len, docs)) for split, docs in splits.items()},
    }
    # The manifest goes last: a build interrupted before this point is simply redone next time.
    tmp = manifest_path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return paths


def read_documents(path: str | Path) -> list[str]:
    """The texts of one split file written by `build_corpus`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"Build the {CORPUS_NAME} corpus.")
    parser.add_argument("out_dir", type=Path, help="directory for train.jsonl, validation.jsonl and test.jsonl")
    args = parser.parse_args(argv)
    paths = build_corpus(args.out_dir)
    manifest = json.loads((args.out_dir / "manifest.json").read_text(encoding="utf-8"))
    for split, path in paths.items():
        chars = manifest["characters"][split]
        # ~4.5 characters per GPT-2 token is typical for English prose; it is only a rough guide.
        print(
            f"{split:>10}: {manifest['documents'][split]:6d} documents, {chars:9d} characters, "
            f"~{chars / 4.5 / 1e6:.2f}M GPT-2-ish tokens -> {path}"
        )


if __name__ == "__main__":
    main()
