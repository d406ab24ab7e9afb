"""Train a TopK sparse autoencoder on a language model's residual stream.

    python train.py                                    # the embedded default (CPU, offline, minutes)
    python train.py --config configs/gpt2-small.yaml --sae.k 64 --run_name k64
    python train.py --config configs/default.yaml --resume
    python train.py --finetune_tokens 262144           # then an end-to-end fine-tune of the SAE (docs/finetune.md)

Every field of `sae.config.TrainConfig` is an option (`--key value` or `--key=value`, dotted for
nested sections: `--sae.n_latents`, `--data.ctx_len`); `--help` lists them. A mistake in the options,
the data or the run folder is one line on stderr and exit status 2. Ctrl-C or SIGTERM (a cluster's
preemption) writes a checkpoint at the end of the step, prints the command that resumes, and exits.
"""

import shlex
import sys

from eval import training_evaluator
from sae.config import parse_args
from sae.errors import run_cli
from sae.finetune import FinetuneOptions, finetune, runs_after_training
from sae.stopping import RunStopped
from sae.trainer import train


def main(argv: list[str]) -> int:
    cfg = parse_args(argv, usage=__doc__)
    finetunes = []  # (SAE folder, fine-tune run folder): refused now, not after training, if one cannot run
    if cfg.finetune_tokens:
        finetunes = runs_after_training(cfg.sae_folders(), [hookpoint for hookpoint, _ in cfg.member_configs()],
                                        cfg.resume)
    try:
        train(cfg, evaluator=training_evaluator)
    except RunStopped as stopped:  # SIGINT or SIGTERM: a checkpoint was written at the step boundary
        if stopped.info.is_main:
            again = [arg for arg in argv if arg not in ("--resume", "--resume=true")] + ["--resume"]
            launcher = "python" if stopped.info.world_size == 1 else "torchrun [the same launcher options]"
            print(f"{stopped}:\n  {launcher} {shlex.join([sys.argv[0] or 'train.py', *again])}", file=sys.stderr)
        return stopped.exit_status
    for sae_dir, run_dir in finetunes:
        finetune(sae_dir, run_dir, FinetuneOptions(tokens=cfg.finetune_tokens, resume=cfg.resume, seed=cfg.seed,
                                                   device=cfg.device, data_dir=cfg.data.data_dir))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
