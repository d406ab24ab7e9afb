"""The command line of eval.browse: `python -m eval.browse SAE_DIR --out DIR [--report PATH] [--force]`.

Its help text is the package's docstring (eval/browse/__init__.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from sae.config import ConfigError, parse_args

from ..__main__ import split_positionals
from . import __doc__ as USAGE
from .inputs import BrowseError
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
    wants_help = "--help" in options or "-h" in positionals + options
    if wants_help or len(positionals) != 1:
        print(USAGE)
        raise SystemExit(0 if wants_help else 2)
    try:
        cfg = parse_args(options, BrowseConfig)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    if not cfg.out:
        raise SystemExit("error: pass --out DIR, the folder to write the site into")
    try:
        index = build_site(positionals[0], cfg.out, cfg.report or None, cfg.force)
    except BrowseError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {index}; open {index.resolve().as_uri()} in a browser")
    return index


if __name__ == "__main__":
    main()
