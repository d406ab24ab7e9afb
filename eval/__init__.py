"""Evaluation of trained SAEs: reconstruction, sparsity and downstream LM loss (`python -m eval`).

    from eval import evaluate
    report = evaluate(sae, model, tokens, hookpoint="transformer.h.8")   # tokens (n_windows, ctx_len)

Modules: splice.py (the LM with its activations replaced), reconstruction.py (nmse, fvu, L0, density),
downstream.py (cross-entropy, KL, loss recovered), evaluate.py (the loop), data.py (held-out text),
ablation.py (ablation sparsity, `--ablation N`), probe.py (probe loss, `--probe`), replacement.py (a transcoder
set spliced in at once, `--replace_all`), scaling.py (scaling-law
fits over runs, `python -m eval.scaling`), report.py (tables, JSON, wandb), __main__.py (the CLI).
Subpackages: explain/ (explain -> simulate -> score, `--explain N`; N2G, `--n2g N`), browse/ (the static
latent browser, `python -m eval.browse`), peers/ (the quality benchmark against sparsify and SAELens).
"""

from .evaluate import activation_mean, evaluate, evaluate_many, training_evaluator

__all__ = ["activation_mean", "evaluate", "evaluate_many", "training_evaluator"]
