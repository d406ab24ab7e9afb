"""`python -m sae.cache ...`: build (and/or verify) an activation cache; see sae.cache and sae.cache.cli."""

from ..errors import run_cli
from .cli import main

if __name__ == "__main__":
    run_cli(main)
