"""The command line of eval.browse: `python -m eval.browse SAE_DIR --out DIR [--report PATH] [--force]`.

Its help text is the package's docstring (eval/browse/__init__.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from sae.config import parse_args
from sae.errors import UsageError, run_cli

from ..__main__ import split_positionals
from . import __doc__ as USAGE
from .site import build_site


@dataclass(frozen=True)
class BrowseConfig:
    """Options of `python -m eval.browse` (the SAE folder is the positional argument)."""

    out: str = ""
    """Folder to write the site into."""

    report: str = ""
    """Eval report JSON (`python -m eval ... --out PATH`) whose numbers and density histogram the index shows."""

    force: bool = False
    """Write into a non-empty folder that is not a previous eval.browse output."""


def main(argv: list[str] | None = None) -> Path:
    """The command line: `python -m eval.browse SAE_DIR --out DIR [--report PATH] [--force]`."""
    positionals, options = split_positionals(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(options, BrowseConfig, usage=USAGE)
    if len(positionals) != 1:
        raise UsageError(f"name one SAE folder, got {len(positionals)}: python -m eval.browse SAE_DIR --out DIR; --help lists the options")
    if not cfg.out:
        raise UsageError("pass --out DIR, the folder to write the site into")
    index = build_site(positionals[0], cfg.out, cfg.report or None, cfg.force)
    print(f"wrote {index}; open {index.resolve().as_uri()} in a browser")
    return index


if __name__ == "__main__":
    run_cli(main)
