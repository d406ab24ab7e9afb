"""End-to-end fine-tune of a trained SAE: a short last phase with the SAE spliced into the LM, trained on
KL(p_clean || p_spliced) plus its own reconstruction loss (Karvonen 2025, arXiv 2503.17272).

    python -m sae.finetune runs/default/transformer.h.2 --tokens 262144

    from sae.finetune import FinetuneOptions, finetune
    folder = finetune("runs/default/transformer.h.2", None, FinetuneOptions(tokens=262144))

loss.py: the spliced loss; run.py: the run (data, Adam, checkpoints, the saved folder); windows.py: batches of
whole windows with exact resume; memory.py: the peak-memory estimate. docs/finetune.md has the measurements.
"""

from .run import FinetuneOptions, finetune, runs_after_training

__all__ = ["FinetuneOptions", "finetune", "runs_after_training"]
