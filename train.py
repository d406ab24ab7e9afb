"""Train a TopK sparse autoencoder on a language model's residual stream.

    python train.py                                    # the embedded default (CPU, offline, minutes)
    python train.py --config configs/gpt2-small.yaml --sae.k 64 --run_name k64
    python train.py --config configs/default.yaml --resume

Every field of `sae.config.TrainConfig` is an option (`--key value` or `--key=value`, dotted for
nested sections: `--sae.n_latents`, `--data.ctx_len`).
"""

import sys

from eval import training_evaluator
from sae.config import ConfigError, parse_args
from sae.optim import NonFiniteLossError
from sae.trainer import train


def main(argv: list[str]) -> None:
    try:
        cfg = parse_args(argv)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    try:
        train(cfg, evaluator=training_evaluator)
    except NonFiniteLossError as error:  # the run diverged: every rank stops with this one line
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
