"""`python -m eval.explain puzzles`: does the scorer know a true explanation when it sees one?

Scores every puzzle (eval/explain/puzzles.py) under each available simulator on held-out text of the
embedded corpus (or --dataset with --model), and reports how often the true explanation beats all of
its decoys and the mean margin over the best decoy.

    python -m eval.explain puzzles
    python -m eval.explain puzzles --simulator_url http://127.0.0.1:8000/v1 --simulator_model NAME
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sae.activations import load_model_and_tokenizer
from sae.config import DataConfig, asks_for_help, parse_args
from sae.embedded import CORPUS_NAME, EMBEDDED_MODEL_DIR
from sae.errors import UsageError, run_cli
from sae.files import atomic_write

from ..data import held_out_windows
from .choose import SimulatorSet
from .options import ScoringOptions
from .puzzles import PUZZLES, puzzle_records, run_puzzles
from .records import TokenStrings


@dataclass(frozen=True)
class PuzzleConfig(ScoringOptions):
    """Options of `python -m eval.explain puzzles` (the scoring ones are `ScoringOptions`, shared with
    `python -m eval`)."""

    model: str = str(EMBEDDED_MODEL_DIR)
    """Tokenizer source (the puzzles are rules over its token strings)."""

    dataset: str = CORPUS_NAME
    """Held-out text: the embedded corpus (its validation split), or a local file / hub dataset."""

    split: str = ""
    """Split to read; empty picks the held-out one."""

    data_dir: str = "data"
    """Where the embedded corpus is written."""

    ctx_len: int = 64
    """Tokens per excerpt window."""

    tokens: int = 32768
    """Held-out tokens to draw excerpts from."""

    seed: int = 0
    """Seeds the choice of excerpts."""

    out: str = ""
    """Write the full report (every score) here as JSON."""


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["puzzles"] and not asks_for_help(argv):
        raise UsageError("the command is `python -m eval.explain puzzles [--options]`; --help lists the options")
    cfg = parse_args(argv[1:] if argv[:1] == ["puzzles"] else argv, PuzzleConfig, usage=__doc__)
    if "n2g" in cfg.simulators.split(","):
        raise UsageError("the puzzles score written explanations; n2g simulates only its own patterns "
                         "(python -m eval --n2g N scores those): leave it out of --simulators")
    _, tokenizer = load_model_and_tokenizer(cfg.model)
    data = DataConfig(dataset=cfg.dataset, ctx_len=cfg.ctx_len, data_dir=cfg.data_dir)
    windows, source = held_out_windows(data, tokenizer, cfg.tokens, cfg.split, training_dataset=False)  # no SAE here
    simulators = SimulatorSet(cfg.simulators, cfg.simulator_backend())
    records = puzzle_records(windows, TokenStrings(tokenizer), seed=cfg.seed)
    report = {"data": source, "puzzles": len(PUZZLES), "simulators": run_puzzles(records, simulators.for_unit("latent"))}
    print(f"{len(PUZZLES)} puzzles on {windows.numel():,} tokens ({source['held_out']})")
    print(f"{'simulator':14} {'true best':>9} {'mean margin':>11} {'mean true score':>15}")
    for name, result in report["simulators"].items():
        print(f"{name:14} {result['true_is_best']:9.2f} {result['mean_margin']:11.3f} {result['mean_true_score']:15.3f}")
    for note in simulators.notes:
        print(f"note: {note}")
    if cfg.out:
        atomic_write(Path(cfg.out), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    return report


if __name__ == "__main__":
    run_cli(main)
