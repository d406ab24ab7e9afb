"""Configuration: one set of dataclasses that is also the YAML schema and the command line.

`TrainConfig` nests `SaeConfig` (the SAE's shape and losses) and `DataConfig` (where the text comes
from). A run's config is a YAML file (`configs/*.yaml`) plus command-line overrides, in either form:

    python train.py --config configs/default.yaml --sae.k 32 --batch_size=8192 --resume

The `--key=value` form is exactly what a wandb sweep agent passes. Unknown keys and values of the
wrong type are errors that name the key and the type it expects; configs are never mutated after
parsing (derived values, such as `d_in` from the model, go into a `dataclasses.replace` copy).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from .embedded import CORPUS_NAME, EMBEDDED_MODEL_DIR
from .errors import UserError


INPUT_SITE_SUFFIX = ":input"
"""An activation site named HOOKPOINT:input is the input of module HOOKPOINT (what a transcoder reads);
HOOKPOINT alone is its output. No module name has a colon."""


def input_site(hookpoint: str) -> str:
    """The site name of the input of module `hookpoint`."""
    return hookpoint + INPUT_SITE_SUFFIX


SAE_AUXK_COEF = 1 / 32
"""Gao et al.'s AuxK weight, our SAEs' default."""
TRANSCODER_AUXK_COEF = 1 / 8
"""Transcoders' default AuxK weight, measured on the embedded model (docs/transcoders.md)."""


@dataclass(frozen=True)
class SaeConfig:
    """Shape and losses of a TopK sparse autoencoder (Gao et al. 2024)."""

    d_in: int = 0
    """Width of the activations. 0 in a training config: taken from the model's hookpoint."""

    n_latents: int = 2048
    """Number of latents (dictionary size). Saved in cfg.json as `num_latents` (sparsify's name)."""

    k: int = 32
    """Number of latents kept per token by the TopK activation."""

    k_aux: int = 512
    """Dead latents used by the AuxK loss per token (capped at the number of dead latents)."""

    auxk_coef: float | None = None
    """Weight of the AuxK loss; 0 turns AuxK off; None: 1/32 for an SAE (Gao et al.), 1/8 for a
    transcoder, whose dead latents 1/32 does not keep alive (docs/transcoders.md). `auxk_weight` is the
    value in use."""

    dead_tokens: int = 10_000_000
    """A latent is dead once it has not fired for this many training tokens."""

    multi_topk: bool = False
    """Add the Multi-TopK loss: fvu (normalized MSE) with the top 4k latents, weighted 1/8."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm (gradient projected, renormalised after each step). A transcoder
    with it off starts its decoder at zero, unconstrained: sparsify's transcoder, which leaves far more
    latents dead (docs/transcoders.md)."""

    transcode: bool = False
    """A transcoder (Dunefsky et al. 2024): reads the INPUT of the hookpoint's module (e.g. an MLP,
    transformer.h.8.mlp) and predicts its OUTPUT. The encoder does not subtract b_dec, b_dec is the
    output's bias, and b_enc starts at -W_enc mean(x), centring each latent's pre-activation on the
    first batch (sparsify's `transcode`). The decoder starts tied to the encoder at unit norm, as an
    SAE's (see normalize_decoder)."""

    skip_connection: bool = False
    """Add a dense linear path from input to output, x @ W_skip.T (d_in x d_in, starts at zero): with
    transcode, a skip transcoder (Paulo, Shabalin & Belrose 2025); sparsify's `skip_connection`, which
    it allows on an SAE too."""

    activation: Literal["topk", "batchtopk"] = "topk"
    """"topk": the k largest latents of each token (Gao et al.). "batchtopk": the k * N largest of a
    batch of N tokens, so L0 varies by token around k (Bussmann, Leask & Nanda 2024, arXiv 2412.06410);
    training keeps a running threshold (`SparseAutoencoder.threshold`) that encodes at inference, one
    token at a time: a latent fires where its pre-activation reaches it (a JumpReLU with one threshold).
    sparsify's cfg.json key; sparsify itself has no "batchtopk"."""

    matryoshka: tuple[int, ...] = ()
    """Matryoshka prefix sizes (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024), ascending and
    below n_latents, e.g. [128, 512]: the first m latents alone must reconstruct too. The loss's
    reconstruction term is the mean fvu over the prefixes and the whole dictionary, each decoding only the
    selected latents below its size (the selection, TopK or BatchTopK, is over all latents). Empty: off."""

    def __post_init__(self):
        prefixes = self.matryoshka
        if any(not isinstance(m, int) or isinstance(m, bool) for m in prefixes) or list(prefixes) != sorted(set(prefixes)) \
                or (prefixes and not 0 < prefixes[0] <= prefixes[-1] < self.n_latents):
            raise ValueError(f"SaeConfig: matryoshka must be ascending distinct prefix sizes in (0, n_latents="
                             f"{self.n_latents}), got {prefixes}")
        if prefixes and self.multi_topk:
            raise ValueError("SaeConfig: multi_topk and matryoshka are two reconstruction losses: choose one")
        if self.activation == "batchtopk" and self.multi_topk:
            raise ValueError("SaeConfig: multi_topk is a TopK loss (the top 4k of each token); "
                             "activation batchtopk selects over the batch: choose one")
        if self.n_latents <= 0 or self.k <= 0:
            raise ValueError(f"SaeConfig: n_latents and k must be positive, got {self.n_latents}, {self.k}")
        if self.k > self.n_latents:
            raise ValueError(f"SaeConfig: k={self.k} exceeds n_latents={self.n_latents}")
        if self.d_in < 0 or self.k_aux < 0 or self.auxk_weight < 0 or self.dead_tokens < 0:
            raise ValueError("SaeConfig: d_in, k_aux, auxk_coef and dead_tokens must be non-negative")

    @property
    def auxk_weight(self) -> float:
        """The AuxK loss's weight: `auxk_coef`, or when unset the default of this kind of coder."""
        if self.auxk_coef is not None:
            return self.auxk_coef
        return TRANSCODER_AUXK_COEF if self.transcode else SAE_AUXK_COEF


def check_outlier_norm_ratio(ratio: float, name: str) -> None:
    """A ValueError naming `name` unless `ratio` is 0 (off) or above 1 (a multiple of the median norm)."""
    if ratio < 0 or 0 < ratio <= 1:
        raise ValueError(f"{name} must be 0 (off) or above 1 (a multiple of the median norm), got {ratio}")


@dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it is cut into windows."""

    dataset: str = CORPUS_NAME
    """A hub dataset name, a local .txt/.json/.jsonl/.parquet file, folder or glob, or
    "stdlib-docs" (the embedded corpus of Python's own docstrings, built on first use)."""

    dataset_config: str | None = None
    """The hub dataset's configuration name, if it has several."""

    split: str = "train"
    """Split to stream. The embedded corpus and local files have train / validation / test, chosen per
    document by a hash of its text (sae/splits.py: 95 / 2.5 / 2.5%); a hub dataset has its own."""

    text_column: str = "text"
    """Column holding the text."""

    ctx_len: int = 64
    """Tokens per window fed to the LM (Gao et al. use 64). The first position of each is dropped."""

    shuffle_buffer_tokens: int = 65536
    """Activations mixed together before batching (tokens, across many windows). Bounds memory."""

    lm_batch_windows: int = 64
    """Windows per LM forward pass."""

    data_dir: str = "data"
    """Where generated corpora (the embedded default) are written."""

    exclude_special_tokens: bool = True
    """Leave out the activations of the tokenizer's BOS, EOS and pad tokens (EOS is also the document
    separator the stream inserts), in training and in the eval of the SAE (sae/hygiene.py)."""

    outlier_norm_ratio: float = 0.0
    """Leave out activations whose norm exceeds this many times the median norm (of their shuffle block in
    training, of the eval's text in an eval; sae/hygiene.py); 0 keeps them all."""

    activation_cache: str = ""
    """Read activations from this cache (`python -m sae.cache`) instead of running the LM. It must have
    been built for the same model, hookpoint and data settings; training then equals streaming."""

    def __post_init__(self):
        if self.ctx_len < 2:
            raise ValueError(f"DataConfig: ctx_len must be at least 2 (the first position is dropped), got {self.ctx_len}")
        check_outlier_norm_ratio(self.outlier_norm_ratio, "DataConfig.outlier_norm_ratio")


@dataclass(frozen=True)
class SaeVariant:
    """One of several SAEs trained together from one activation stream (`TrainConfig.variants`).

    Fields left unset (None / empty) take the run's values: `TrainConfig.sae`, `hookpoint`, `lr`.
    """

    name: str
    """Folder name of this SAE under the run (RUN_DIR/NAME) and the prefix of its metrics (NAME/fvu)."""

    hookpoint: str = ""
    n_latents: int | None = None
    k: int | None = None
    k_aux: int | None = None
    auxk_coef: float | None = None
    dead_tokens: int | None = None
    multi_topk: bool | None = None
    transcode: bool | None = None
    skip_connection: bool | None = None
    activation: Literal["topk", "batchtopk"] | None = None
    matryoshka: tuple[int, ...] | None = None
    lr: float | None = None
    seed: int | None = None
    """Seeds this SAE's initialisation (default: the run's `seed`). The batches stay the run's: variants that
    differ only in seed measure the spread that initialisation alone gives (`python -m eval.pareto`)."""

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"SaeVariant.name must be a plain folder name, got {self.name!r}")

    def sae_config(self, base: SaeConfig) -> SaeConfig:
        """`base` with this variant's SAE fields applied."""
        names = ("n_latents", "k", "k_aux", "auxk_coef", "dead_tokens", "multi_topk", "transcode", "skip_connection",
                 "activation", "matryoshka")
        return replace(base, **{name: getattr(self, name) for name in names if getattr(self, name) is not None})


@dataclass(frozen=True)
class TrainConfig:
    """A training run: which LM and hookpoint, which SAE, how to optimise, where to log and save."""

    model: str = str(EMBEDDED_MODEL_DIR)
    """LM name on the hub or local folder, for `AutoModelForCausalLM.from_pretrained`."""

    hookpoint: str = "transformer.h.2"
    """Module whose output is the residual stream to encode (GPT-2: `transformer.h.8`)."""

    model_init: Literal["pretrained", "random"] = "pretrained"
    """"random": train on the same architecture and tokenizer with freshly initialised weights (seeded by
    `model_init_seed`), the random-model baseline of Heap et al. 2025; `python -m eval` rebuilds the
    same LM from the SAE's cfg.json, so its scores sit beside the trained LM's SAE (docs/metrics.md)."""

    model_init_seed: int = 0
    """Seeds the weights of a `model_init: random` LM (independent of `seed`, so SAE seeds can vary
    on one random LM)."""

    sae: SaeConfig = field(default_factory=lambda: SaeConfig(n_latents=2048, k=16, k_aux=256, dead_tokens=20_000))
    """The SAE. The default suits the embedded model (Gao et al. use dead_tokens=10M on larger runs)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where the training text comes from and how it is cut into windows."""

    variants: tuple[SaeVariant, ...] = ()
    """Several SAEs trained at once from the same activations (one LM forward per batch for all), e.g.
    a sweep of k or width, or several hookpoints. Empty: the one SAE `sae` at `hookpoint`."""

    batch_size: int = 4096
    """Activations (tokens) per optimiser step."""

    max_tokens: int = 4_000_000
    """Training tokens in total, rounded down to whole batches (`total_steps`; the trainer says so)."""

    finetune_tokens: int = 0
    """After training, fine-tune each SAE end to end for this many tokens (`python -m sae.finetune`'s defaults:
    KL to the clean LM plus the training loss, docs/finetune.md) into RUN-finetuned (RUN-finetuned-NAME for a
    variant); 0: none. One process only (not under torchrun)."""

    optimizer: Literal["adam", "schedule_free_adam"] = "schedule_free_adam"
    """"adam": Adam (Gao et al.). "schedule_free_adam": schedule-free AdamW without weight decay
    (Defazio et al. 2024); its SAEs are the averaged iterate (sae/members.py, `evaluation_sae`)."""

    lr: float | None = None
    """Learning rate; None uses `sae.optim.default_lr` (per optimizer: from k and the batch size, or for
    adam the width)."""

    lr_warmup_steps: int = 0
    """Linear warmup steps. The default 0 suits schedule_free_adam, which warmup only slows down
    (docs/peers.md)."""

    lr_decay_frac: float = 0.0
    """Fraction of training, at the end, over which the learning rate decays linearly: over the last
    int(lr_decay_frac * steps) steps, down to lr / that many at the last step (`optim.lr_at`). With
    schedule_free_adam the decay shrinks the steps of its iterate z (and of y); the average x still
    weights each iterate by the largest lr so far (see schedule_free_r), so the late, smaller steps
    keep their full weight in it."""

    grad_clip: float = 1.0
    """Gradient-norm clip; 0 turns it off."""

    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """b_dec at the start, from the first batch: its geometric median (Gao et al.), its mean, or zeros."""

    scale_inputs: bool = True
    """Train on activations times one scale, fixed on the first batch so that E||x||^2 = d_in (Gao et
    al.; the default lr rule assumes it); saved SAEs are folded back to raw activations either way."""

    fit_encoder_scale: bool = True
    """Shrink the tied encoder init (W_enc = W_dec^T) where its first reconstruction overshoots: by the
    largest factor <= 1 at which the first batch is reconstructed no worse than by b_dec alone (at
    large k; sae/initialization.py). OpenAI's reference code (`init_from_data_`) rescales the tied
    encoder too, by another rule (1 / the mean norm of what random unit directions reconstruct to).
    A transcoder's is fitted the same way, to its outputs. False leaves the tied encoder unscaled."""

    adam_beta1: float = 0.9
    """Adam's first-moment decay; for schedule_free_adam the interpolation weight of y between the
    average x and the Adam iterate z (Defazio et al. 2024)."""

    adam_beta2: float = 0.999
    """Adam's second-moment decay."""

    adam_eps: float = 6.25e-10
    """Adam's epsilon (Gao et al.'s value, for their normalised loss)."""

    schedule_free_r: float | None = None
    """schedule_free_adam only: the average x weights the iterate z_t of step t (t = 1, 2, ...) by
    t^r * lr_max_t^2, where lr_max_t is the largest lr of steps 1..t (the schedulefree library's
    rule, its weight_lr_power 2): warmup steps weigh less, steps of the final decay do not. 0 is
    Defazio et al.'s (2024) average, uniform once the lr stops rising; a larger r forgets the early
    iterates faster.
    None: 1, chosen on the peer benchmark (docs/peers.md)."""

    shard_latents: int = 1
    """Under torchrun: split the latents over this many ranks (world size = replicas x shard_latents);
    the ranks of a shard group read the same data and pick the global top k together."""

    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the LM's forward pass (activations are trained on in float32)."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The SAE's training matmuls and kernel inputs: "bf16" (mixed precision: float32 parameters,
    gradients, optimiser state and losses; TF32 allowed for float32 matmuls on CUDA), "fp32", or "auto":
    bf16 on CUDA GPUs of compute capability >= 8.0, fp32 elsewhere. Saved SAEs are float32 either way."""

    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda" or "cuda:N"."""

    seed: int = 0
    """Seeds parameter init and the activation shuffle."""

    collective_timeout_s: float = 300
    """Under torchrun: how long a step's collective waits for a rank before the job fails (a hung
    rank). Waits while rank 0 alone writes a checkpoint, evaluates or starts wandb are not bounded by
    it (sae/distributed.py, MAIN_RANK_WORK_TIMEOUT)."""

    run_name: str = "default"
    """The run's folder under `out_dir`, and its wandb name; "auto" takes the run id that `wandb agent`
    sets (WANDB_RUN_ID), so each run of a sweep gets its own folder."""

    out_dir: str = "runs"
    """Runs are written to OUT_DIR/RUN_NAME/ (checkpoints/ and one SAE folder per hookpoint)."""

    eval_every: int = 0
    """Steps between held-out evals (eval.evaluate: fvu, L0, ce_recovered, kl ...); 0 turns them off."""

    eval_tokens: int = 16384
    """Held-out tokens per eval."""

    eval_split: str = ""
    """Held-out split for those evals; empty picks one (the embedded corpus and local files: validation;
    a hub dataset: validation or test). The training split is refused; a hub dataset with no other
    split needs one named here."""

    log_every: int = 10
    """Steps between metric lines (stdout and wandb)."""

    save_every: int = 200
    """Steps between checkpoints; 0 saves only at the end."""

    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are pruned)."""

    resume: bool = False
    """Continue from the latest checkpoint in OUT_DIR/RUN_NAME/checkpoints."""

    wandb_project: str = "topk-sae"
    """wandb project."""

    wandb_mode: Literal["online", "offline", "disabled"] = "disabled"
    """wandb mode; offline and disabled need no network."""

    def __post_init__(self):
        for name in ("batch_size", "max_tokens", "log_every", "shard_latents", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_tokens < self.batch_size:
            raise ValueError(f"TrainConfig.max_tokens ({self.max_tokens:,}) is less than one batch (batch_size "
                             f"{self.batch_size:,}): the run would take no step and save an untrained SAE")
        for name in ("eval_every", "save_every", "lr_warmup_steps", "finetune_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lr_decay_frac <= 1:
            raise ValueError(f"TrainConfig.lr_decay_frac must be in [0, 1], got {self.lr_decay_frac}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive (or null for the default), got {self.lr}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if self.adam_eps <= 0 or (self.schedule_free_r or 0) < 0:
            raise ValueError(f"TrainConfig.adam_eps must be positive and schedule_free_r >= 0, got {self.adam_eps} and {self.schedule_free_r}")
        if self.schedule_free_r is not None and self.optimizer != "schedule_free_adam":
            raise ValueError(f"TrainConfig.schedule_free_r applies to optimizer=schedule_free_adam only, not '{self.optimizer}'")
        names = [variant.name for variant in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"TrainConfig.variants: names must be unique, got {names}")

    @property
    def hookpoints(self) -> list[str]:
        """The activation sites the run reads, in order, each once: each SAE's hookpoint (its variants', a
        variant without one taking `hookpoint`; or `hookpoint` without variants), a transcoder's preceded
        by the input of its module (`input_site`)."""
        sites = []
        for hookpoint, sae in self.member_configs():
            sites += [input_site(hookpoint), hookpoint] if sae.transcode else [hookpoint]
        return list(dict.fromkeys(sites))

    def member_seeds(self) -> list[int]:
        """The initialisation seed of each SAE of the run, in `member_configs`' order."""
        return [variant.seed if variant.seed is not None else self.seed for variant in self.variants] or [self.seed]

    def member_configs(self) -> list[tuple[str, SaeConfig]]:
        """(hookpoint, SAE config) of each SAE of the run: its variants', or the single `sae` at `hookpoint`."""
        return ([(variant.hookpoint or self.hookpoint, variant.sae_config(self.sae)) for variant in self.variants]
                or [(self.hookpoint, self.sae)])

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the run: `max_tokens` rounded down to whole batches (at least one, as
        validated). Down, not up or to the nearest: a run never reads more text than it was given, and
        an activation cache built for `max_tokens` (sae/cache) holds every batch the run trains on."""
        return self.max_tokens // self.batch_size

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name

    def sae_folders(self) -> list[Path]:
        """The folder each SAE of the run is saved in: RUN_DIR/NAME for a variant, RUN_DIR/HOOKPOINT alone."""
        names = [variant.name for variant in self.variants] or [""]
        return [self.run_dir / (name or hookpoint) for name, (hookpoint, _) in zip(names, self.member_configs())]

    def provenance(self, hookpoint: str) -> dict[str, Any]:
        """What an SAE of this run at `hookpoint` was trained on, for its cfg.json: the LM, the hookpoint
        and the text (`python -m eval` reads these to find the model and the held-out text)."""
        return {
            "model": self.model, "hookpoint": hookpoint, "ctx_len": self.data.ctx_len, "dataset": self.data.dataset,
            "dataset_config": self.data.dataset_config, "split": self.data.split, "text_column": self.data.text_column,
            "exclude_special_tokens": self.data.exclude_special_tokens, "outlier_norm_ratio": self.data.outlier_norm_ratio,
            **self.model_init_record(),
        }

    def model_init_record(self) -> dict[str, Any]:
        """cfg.json's record of a random-init LM (nothing for a pretrained one): how to rebuild it, and the
        versions whose init code drew it (another torch or transformers may draw other weights)."""
        if self.model_init == "pretrained":
            return {}
        import torch
        import transformers

        return {"model_init": "random", "model_init_seed": self.model_init_seed,
                "model_init_versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

    @property
    def model_identity(self) -> str:
        """The LM as an activation cache's manifest names it: a random-init LM is not its pretrained twin."""
        if self.model_init == "pretrained":
            return self.model
        return f"{self.model} (random init, seed {self.model_init_seed})"


class ConfigError(UserError, ValueError):
    """A config key is unknown or its value has the wrong type."""


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, checking every key and value type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(fields))}")
        default = _default_of(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a section given in part changes those keys of the section's default, nothing else
            # (`--sae.k 8` keeps the default SAE's n_latents, k_aux and dead_tokens)
            value = {**to_dict(default), **value}
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _default_of(field: dataclasses.Field) -> Any:
    """A field's default value (built by its default_factory), or None when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against type `hint`, converting only where it loses nothing (e.g. 1e6 -> int)."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {_type_name(hint)}, got {value!r}")
    if origin is tuple and len(typing.get_args(hint)) == 2 and typing.get_args(hint)[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        item_hint = typing.get_args(hint)[0]
        return tuple(_coerce(item_hint, item, f"{key}[{index}]") for index, item in enumerate(value))
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"config key '{key}' expects one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif hint is float:
        number = _as_number(value)
        if number is not None:
            return float(number)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' expects {_type_name(hint)}, got {value!r}")


def _as_number(value: Any) -> float | int | None:
    """A number from an int, float or numeric string ("1e6", "10_000"; YAML reads 1e6 as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict of a config (for YAML, JSON and wandb); tuples become lists, as in JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _set_nested(tree: dict, dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    for parent in parents:
        node = tree.setdefault(parent, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{parent}' is not a section, cannot set '{dotted_key}'")
        tree = node
    tree[leaf] = value


def _bool_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of the boolean fields, which may appear on the command line without a value."""
    keys = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys |= _bool_keys(hint, f"{prefix}{name}.")
        elif hint is bool:
            keys.add(prefix + name)
    return keys


def parse_args(argv: list[str], cls: type = TrainConfig, usage: str = "") -> Any:
    """Config from `--config FILE` (YAML) and `--key value` / `--key=value` / `--flag` overrides.

    Dotted keys reach nested sections (`--sae.k 64`). Values are read as YAML scalars, then checked
    against the field's type. `--help` or `-h` prints `usage` (the entry point's docstring) and every
    option (`options_help`), then exits with status 0.
    """
    if asks_for_help(argv):
        print((usage.strip() + "\n\n" if usage else "") + "options:\n" + CONFIG_OPTION_HELP + "\n" + options_help(cls))
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    overrides: list[tuple[str, Any]] = []
    bool_keys = _bool_keys(cls)
    position = 0
    while position < len(argv):
        argument = argv[position]
        position += 1
        if not argument.startswith("--"):
            raise ConfigError(f"unexpected argument {argument!r}; options look like --key value or --key=value")
        key, has_value, value = argument[2:].partition("=")
        key = key.replace("-", "_")
        if not has_value:
            next_is_value = position < len(argv) and not argv[position].startswith("--")
            if key in bool_keys and not next_is_value:
                value = "true"
            elif not next_is_value:
                raise ConfigError(f"option --{key} needs a value")
            else:
                value = argv[position]
                position += 1
        if key == "config":
            tree = load_yaml(value)
        else:
            overrides.append((key, yaml.safe_load(value) if value != "" else ""))
    for key, value in overrides:
        _set_nested(tree, key, value)
    return from_dict(cls, tree)


CONFIG_OPTION_HELP = "  --config FILE\n      A YAML file of these options (sections as mappings); options given with it override it."


def asks_for_help(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv


def options_help(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """Every option of config dataclass `cls`: its dotted name, type, default and docstring, one
    entry each (nested sections are listed under their dotted names, with the section's defaults)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    entries = []
    for item in dataclasses.fields(cls):
        default = getattr(defaults, item.name) if defaults is not None else _default_of(item)
        if dataclasses.is_dataclass(hints[item.name]):
            entries.append(options_help(hints[item.name], f"{prefix}{item.name}.", default))
            continue
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        shown = "required" if required else f"default: {_show_default(default)}"
        meaning = docs.get(item.name, "")
        entries.append(f"  --{prefix}{item.name} {_metavar(hints[item.name])}  ({shown})"
                       + "".join(f"\n      {line}" for line in meaning.splitlines()))
    return "\n".join(entries)


def _metavar(hint: Any) -> str:
    """How an option's value is written: INT, FLOAT, TEXT, BOOL, {a,b}, LIST, with |null if optional."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if option is type(None) else _metavar(option) for option in typing.get_args(hint))
    if origin is Literal:
        return "{" + ",".join(str(option) for option in typing.get_args(hint)) + "}"
    if origin is tuple:
        return "LIST"
    return {int: "INT", float: "FLOAT", str: "TEXT", bool: "[BOOL]"}.get(hint, _type_name(hint))


def _show_default(value: Any) -> str:
    """A default as it is written in YAML or on the command line: false, null, [a, b], "", 16."""
    return json.dumps(value) if isinstance(value, (bool, type(None), tuple)) or value == "" else str(value)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of dataclass `cls`: the string literal right below it in the class
    body (the convention of this package's configs, read from the source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as file:
            tree = yaml.safe_load(file) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return tree


def load_config(path: str | Path, cls: type = TrainConfig) -> Any:
    """Config from a YAML file alone."""
    return from_dict(cls, load_yaml(path))
