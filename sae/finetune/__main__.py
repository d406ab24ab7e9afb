"""`python -m sae.finetune SAE_DIR --tokens N [options]`: fine-tune a trained SAE end to end, spliced into its LM
(KL(p_clean || p_spliced) + its reconstruction loss; docs/finetune.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import run_cli
from .run import FinetuneOptions, finetune

DEFAULTS = FinetuneOptions(tokens=1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sae.finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sae_dir", help="the SAE folder to fine-tune (written by train.py; its cfg.json names the model, "
                                   "hookpoint and training text, whose training split is read)")
    p.add_argument("--tokens", type=int, required=True,
                   help="LM tokens to fine-tune on; steps = tokens // (batch_windows * ctx_len)")
    p.add_argument("--out", default=None,
                   help="the run folder (RUN_DIR/HOOKPOINT is the fine-tuned SAE, with log.jsonl and checkpoints/); "
                        "default: next to the SAE's run folder RUN, RUN-finetuned, or RUN-finetuned-NAME when the SAE "
                        "folder NAME is not its hookpoint (a variant). A folder that holds anything is refused "
                        "without --resume")
    p.add_argument("--kl_coef", type=float, default=DEFAULTS.kl_coef,
                   help="weight of KL(p_clean || p_spliced); the reconstruction loss has weight 1")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr,
                   help="Adam's peak learning rate (5%% warmup, then linear decay; chosen in docs/finetune.md)")
    p.add_argument("--batch_windows", type=int, default=DEFAULTS.batch_windows,
                   help="windows of ctx_len tokens per step")
    p.add_argument("--log_every", type=int, default=DEFAULTS.log_every, help="steps between lines of RUN_DIR/log.jsonl")
    p.add_argument("--save_every", type=int, default=DEFAULTS.save_every, help="steps between checkpoints; 0: none")
    p.add_argument("--keep_checkpoints", type=int, default=DEFAULTS.keep_checkpoints, help="checkpoints kept")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (bit for bit as if never stopped)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seeds the mixing of windows into batches")
    p.add_argument("--device", default=DEFAULTS.device, help='"auto" (cuda if available), "cpu", "cuda" or "cuda:N"')
    p.add_argument("--data_dir", default=DEFAULTS.data_dir, help="where the embedded corpus is built")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = vars(parser().parse_args(argv))
    sae_dir, out = args.pop("sae_dir"), args.pop("out")
    return finetune(sae_dir, out, FinetuneOptions(**args))


if __name__ == "__main__":
    run_cli(main)
