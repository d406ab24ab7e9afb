"""`python -m sae.cache ...`: build (and/or verify) an activation cache; see sae.cache and sae.cache.cli."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
