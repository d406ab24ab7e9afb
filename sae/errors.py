"""Errors that are the user's mistake, not a bug: a config value, a path, a run name, a model that
does not fit the data. Entry points (train.py, `python -m eval`, `python -m sae.cache`, ...) run their
`main` through `run_cli`, which prints such an error as one line on stderr and exits with status 2;
any other exception is a bug in our code and keeps its traceback.

Each class is also the builtin a caller would catch (`UsageError` is a ValueError, ...), so library
code raising them stays usable without this module. A leaf: it imports nothing from the project.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

USER_ERROR_STATUS = 2  # what argparse and most Unix tools exit with on a usage error


class UserError(Exception):
    """Base of the user's mistakes (see the module docstring)."""


class UsageError(UserError, ValueError):
    """A value the run cannot use: a hookpoint, a split, a ctx_len, a run that cannot be resumed."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class RunExistsError(UserError, FileExistsError):
    """The run folder already holds a run and --resume was not given."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run an entry point's `main()`: a UserError becomes `error: MESSAGE` on stderr and exit status 2;
    an integer it returns is the exit status."""
    try:
        status = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS) from None
    raise SystemExit(status if isinstance(status, int) else 0)
