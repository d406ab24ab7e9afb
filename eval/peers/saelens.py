"""SAELens's own TopK, BatchTopK and Matryoshka SAEs and `SAETrainer`, with their defaults, on the
benchmark's shared batches.

SAELens (https://github.com/jbloomAus/SAELens, sae_lens 6.x) trains from any iterator of activation
batches (its `DataProvider`), so the shared order is handed to it directly. What is set here is only
what its `SAETrainerConfig` and training-SAE configs require or what the benchmark fixes: sizes, k,
the Matryoshka widths, the step count, CPU, float32, no wandb. Everything else is SAELens's default,
among them:

    Adam lr 3e-4, betas (0.9, 0.999), constant schedule, no warm-up or decay; gradient-norm clipping 1.0
    loss  sum_d (x - x_hat)^2 averaged over the batch, plus AuxK with k_aux = d_in // 2, coefficient 1.0
          (scaled down while fewer than k_aux latents are dead), dead = no firing for 1000 steps
    init  W_dec rows of norm 0.1 (kaiming-uniform directions), W_enc = W_dec^T, b_enc = b_dec = 0
    rescale_acts_by_decoder_norm (the selection is on the pre-activations times the decoder norms;
          decoder not constrained), b_dec subtracted from the input, no activation normalization

The kinds (`new_training_sae`): TopK keeps the top k of each row. BatchTopK (saes/batchtopk_sae.py)
keeps the top k*B of the batch's B rows after ReLU, and keeps a threshold: an exponential moving
average of the smallest kept value, topk_threshold_lr 0.01 per step from 0. Matryoshka
(saes/matryoshka_batchtopk_sae.py) is BatchTopK inside, plus the squared error of each inner prefix's
reconstruction added to the loss, and AuxK over the whole SAE (use_matryoshka_aux_loss False).

The SAE at each checkpoint step is converted to our unit-norm format (`to_our_sae`) and saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from sae_lens.config import LoggingConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig
from torch import Tensor

from sae.config import ConfigError, SaeConfig
from sae.formats.saelens import WEIGHT_NAMES, our_tensors
from sae.model import SparseAutoencoder


def new_training_sae(d_in: int, n_latents: int, k: int, seed: int = 0, activation: str = "topk",
                     matryoshka: tuple[int, ...] = ()) -> TopKTrainingSAE:
    """SAELens's training SAE at its default init, on CPU in float32, seeded by torch.manual_seed: TopK
    (activation "topk"), BatchTopK ("batchtopk"), or with `matryoshka` prefix sizes (ascending, below
    n_latents) its Matryoshka BatchTopK SAE, whose widths are the prefixes and n_latents (SAELens's own
    completion of the list). A ConfigError for a kind SAELens has no trainer for."""
    if matryoshka and activation != "batchtopk":
        raise ConfigError(f"SAELens's Matryoshka SAE is BatchTopK inside: matryoshka {list(matryoshka)} needs "
                          "activation batchtopk (--sae.activation=batchtopk)")
    sizes = {"d_in": d_in, "d_sae": n_latents, "k": k, "device": "cpu", "dtype": "float32"}
    torch.manual_seed(seed)
    if matryoshka:
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **sizes, matryoshka_widths=[*matryoshka, n_latents]))
    if activation == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**sizes))
    return TopKTrainingSAE(TopKTrainingSAEConfig(**sizes))


@torch.no_grad()
def to_our_sae(saelens_sae: TopKTrainingSAE | TopKSAE) -> SparseAutoencoder:
    """Our SparseAutoencoder computing exactly what the SAELens SAE computes at inference (up to rounding).

    TopK (sae_lens/saes/topk_sae.py, `encode_with_hidden_pre`, `decode`, `TopK`), with
    W_enc (d_in, n_latents), W_dec (n_latents, d_in), decoder row norms n (n_latents,):

        h     = ((x - b_dec) @ W_enc + b_enc) * n         (* n: rescale_acts_by_decoder_norm)
        f     = ReLU of the top k of h, zero elsewhere    (top-k first, then ReLU, as ours)
        x_hat = (f / n) @ W_dec + b_dec

    So with our W_enc' = (W_enc * n)^T, b_enc' = b_enc * n, W_dec' = W_dec / n (unit rows), b_dec' = b_dec,
    our pre-activations are h, our latents are f, and our reconstruction is x_hat: the same fold as
    SAELens's own `_fold_norm_topk` when it saves an inference SAE. Without rescaling, the selection
    would be among the unscaled pre-activations, which a unit-norm decoder cannot in general reproduce,
    so that (and input normalization, or an input without b_dec subtracted) is refused.

    BatchTopK and Matryoshka (saes/batchtopk_sae.py `process_state_dict_for_saving_inference`): the
    inference SAE is a JumpReLU SAE with the same fold and every entry of its `threshold` (n_latents,)
    the running topk_threshold theta (float64, an average of kept values of h) cast to the SAE's dtype:

        f     = ReLU(h) * (h > theta)                     (saes/jumprelu_sae.py `JumpReLUSAE.encode`)
        x_hat = f @ (W_dec / n) + b_dec

    Ours is the BatchTopK SAE (activation "batchtopk") with the same weights and `threshold` theta cast
    the same way; it keeps h where h >= theta and h > 0 (theta >= 0 here), so the two differ only where
    a pre-activation equals theta exactly. A Matryoshka SAE's prefixes shape only its training loss:
    they are recorded in our SaeConfig.matryoshka (its widths without the last, n_latents).

    The training-loss fields of the returned SaeConfig (k_aux, auxk_coef, dead_tokens) are our
    defaults; SAELens's training is not described by them.
    """
    cfg = saelens_sae.cfg
    if not cfg.rescale_acts_by_decoder_norm:
        raise ValueError("to_our_sae needs rescale_acts_by_decoder_norm=True: otherwise SAELens's TopK or "
                         "BatchTopK selection depends on the decoder norms, which our unit-norm decoder cannot express")
    if not cfg.apply_b_dec_to_input or cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
        raise ValueError("to_our_sae converts SAELens TopK and BatchTopK SAEs with apply_b_dec_to_input=True, "
                         "normalize_activations='none' and reshape_activations='none' only")
    if not float(cfg.k).is_integer():
        raise ValueError(f"to_our_sae needs a whole k (our SaeConfig.k is an int), got {cfg.k}")
    dtype = saelens_sae.W_dec.dtype
    stored = {name: getattr(saelens_sae, name).detach() for name in WEIGHT_NAMES}
    tensors = our_tensors(stored, dtype, rescale=True, b_dec_on_input=True)
    kind = {}
    if isinstance(saelens_sae, BatchTopKTrainingSAE):
        kind["activation"] = "batchtopk"
        # as process_state_dict_for_saving_inference: the float64 threshold's value, rounded to the dtype
        tensors["threshold"] = torch.tensor(saelens_sae.topk_threshold.item(), dtype=dtype)
    if isinstance(saelens_sae, MatryoshkaBatchTopKTrainingSAE):
        kind["matryoshka"] = tuple(cfg.matryoshka_widths[:-1])  # the last width is always n_latents
    ours = SparseAutoencoder(SaeConfig(d_in=cfg.d_in, n_latents=cfg.d_sae, k=int(cfg.k), **kind), dtype=dtype)
    ours.load_state_dict(tensors)
    return ours


def _checked_batches(batches: Iterator[tuple[Tensor, Tensor]], steps: int, batch_size: int, d_in: int,
                     on_steps_done: Callable[[int], None]) -> Iterator[Tensor]:
    """Yields the targets of the first `steps` (inputs, targets) batches of `batches`, each checked to be
    (batch_size, d_in) (an SAE's inputs are its targets).

    Before handing out batch s+1 it calls on_steps_done(s): SAETrainer.fit asks for the next batch only
    after its previous step's optimizer step, so at that moment the SAE has taken exactly s steps.
    """
    for steps_done in range(steps):
        on_steps_done(steps_done)
        pair = next(batches, None)
        if pair is None:
            raise ValueError(f"train_saelens: the batches ran out after {steps_done} of {steps} steps")
        _, batch = pair
        # SAETrainer counts samples, not steps: a batch of another size would change the step count.
        if tuple(batch.shape) != (batch_size, d_in):
            raise ValueError(f"train_saelens: batch {steps_done + 1} has shape {tuple(batch.shape)}, "
                             f"expected {(batch_size, d_in)}")
        yield batch


def train_saelens(batches: Iterator[tuple[Tensor, Tensor]], steps: int, batch_size: int, d_in: int, n_latents: int,
                  k: int, checkpoint_steps: list[int], out_dir: Path, metadata: dict, seed: int = 0,
                  lr_factor: float = 1.0, activation: str = "topk", matryoshka: tuple[int, ...] = ()) -> dict[int, Path]:
    """Train SAELens's SAE of the kind `activation` and `matryoshka` say (`new_training_sae`: TopK,
    BatchTopK or Matryoshka BatchTopK; its trainer's defaults, its default learning rate times `lr_factor`) for
    `steps` steps on `batches` of (inputs, targets), each (batch_size, d_in) float32 — the benchmark's shared
    order of activation rows; it reconstructs the targets (an SAE's are its inputs). After each step in
    `checkpoint_steps` (1-based step counts, increasing; the last one is `steps`), write the SAE converted to our format
    (sae.model.SparseAutoencoder, unit-norm decoder) to out_dir / f"step-{step:08d}" with `metadata` (plus
    {"system": "saelens", "tokens_trained": step*batch_size}); return {step: folder}.

    Exactly `steps` batches are taken from `batches`: SAELens's default normalize_activations is "none", so
    it draws no extra batches for a norm estimate.
    """
    increasing = sorted(set(checkpoint_steps)) == list(checkpoint_steps)
    if not (checkpoint_steps and increasing and checkpoint_steps[0] >= 1 and checkpoint_steps[-1] == steps):
        raise ValueError(f"checkpoint_steps must increase from >= 1 to steps={steps}, got {checkpoint_steps}")
    sae = new_training_sae(d_in, n_latents, k, seed, activation, tuple(matryoshka))
    out_dir = Path(out_dir)
    folders: dict[int, Path] = {}

    def save_if_checkpoint(steps_done: int) -> None:
        if steps_done in checkpoint_steps:
            folders[steps_done] = to_our_sae(sae).save(out_dir / f"step-{steps_done:08d}", metadata={
                **metadata, "system": "saelens", "tokens_trained": steps_done * batch_size})

    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer_cfg.lr *= lr_factor
    # SAETrainerConfig leaves lr_end None but SAETrainer asserts it is set; SAELens's runner config
    # defaults it to lr / 10. The constant schedule without decay steps never uses it.
    trainer_cfg.lr_end = trainer_cfg.lr / 10
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae,
                         data_provider=_checked_batches(iter(batches), steps, batch_size, d_in, save_if_checkpoint))
    with torch.enable_grad():  # the caller may be under no_grad (an eval loop); training needs gradients
        trainer.fit()  # with normalize_activations "none" fit folds nothing into the weights afterwards
    save_if_checkpoint(steps)  # fit asks for no batch after the last step
    return folders
