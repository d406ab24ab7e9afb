"""Several SAEs from one activation stream (`TrainConfig.variants`) equal separate runs."""

import json
from dataclasses import replace

import pytest
import torch

from sae import SparseAutoencoder
from sae.config import ConfigError, DataConfig, SaeConfig, SaeVariant, TrainConfig, parse_args
from sae.trainer import train

VARIANTS = (
    SaeVariant(name="k2", k=2),
    SaeVariant(name="wide", n_latents=256, lr=2e-3),
    SaeVariant(name="block2", hookpoint="transformer.h.2", k_aux=8, dead_tokens=500),
)


def base_config(tiny_lm_dir, text_file, tmp_path, **overrides) -> TrainConfig:
    values = dict(
        model=str(tiny_lm_dir), hookpoint="transformer.h.1",
        sae=SaeConfig(n_latents=128, k=4, k_aux=16, dead_tokens=2000),
        data=DataConfig(dataset=str(text_file), ctx_len=16, shuffle_buffer_tokens=512),
        batch_size=128, max_tokens=128 * 30, lr_warmup_steps=5, log_every=5, save_every=10,
        out_dir=str(tmp_path / "runs"), run_name="multi",
    )
    values.update(overrides)
    return TrainConfig(**values)


def single_config(cfg: TrainConfig, variant: SaeVariant) -> TrainConfig:
    """The run that trains `variant` alone."""
    return replace(cfg, variants=(), run_name=f"single-{variant.name}", sae=variant.sae_config(cfg.sae),
                   hookpoint=variant.hookpoint or cfg.hookpoint, lr=variant.lr if variant.lr is not None else cfg.lr)


def test_variants_equal_separate_runs(tiny_lm_dir, text_file, tmp_path):
    cfg = base_config(tiny_lm_dir, text_file, tmp_path, variants=VARIANTS)
    first_dir = train(cfg)
    assert first_dir == cfg.run_dir / "k2"
    for variant in VARIANTS:
        together = SparseAutoencoder.load(cfg.run_dir / variant.name)
        alone = SparseAutoencoder.load(train(single_config(cfg, variant)))
        assert together.cfg == alone.cfg
        for name, tensor in alone.state_dict().items():
            torch.testing.assert_close(together.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{variant.name}: {name}")
        saved = json.loads((cfg.run_dir / variant.name / "cfg.json").read_text())
        assert saved["variant"] == variant.name and saved["hookpoint"] == (variant.hookpoint or cfg.hookpoint)
    log = [json.loads(line) for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    assert {"k2/fvu", "wide/fvu", "block2/fvu", "block2/dead_frac", "wide/lr", "tokens_per_s"} <= set(log[-1])
    assert log[-1]["wide/lr"] != log[-1]["k2/lr"]


def test_variants_resume_exactly(tiny_lm_dir, text_file, tmp_path):
    full = base_config(tiny_lm_dir, text_file, tmp_path, variants=VARIANTS[:2], run_name="full")
    train(full)
    half = replace(full, run_name="halves", max_tokens=128 * 20)
    train(half)
    train(replace(half, max_tokens=full.max_tokens, resume=True))
    for variant in VARIANTS[:2]:
        a = SparseAutoencoder.load(full.run_dir / variant.name)
        b = SparseAutoencoder.load(half.run_dir / variant.name)
        for name, tensor in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], tensor), (variant.name, name)


def test_variant_config_errors(tmp_path):
    with pytest.raises(ValueError, match="names must be unique"):
        TrainConfig(variants=(SaeVariant("a"), SaeVariant("a")))
    with pytest.raises(ValueError, match="plain folder name"):
        SaeVariant("a/b")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("variants:\n  - {name: k8, k: 8}\n  - {name: w, n_latents: 4096, hookpoint: transformer.h.1}\n")
    cfg = parse_args(["--config", str(sweep)])
    assert [v.sae_config(cfg.sae).k for v in cfg.variants] == [8, cfg.sae.k]
    with pytest.raises(ConfigError, match=r"variants\[0\].kk"):
        sweep.write_text("variants:\n  - {name: a, kk: 8}\n")
        parse_args(["--config", str(sweep)])


def test_variants_at_two_hookpoints_train_from_one_cache_as_from_the_stream(tiny_lm_dir, text_file, tmp_path):
    from sae.cache import ActivationCache, build_cache

    cfg = base_config(tiny_lm_dir, text_file, tmp_path, variants=VARIANTS, save_every=0, run_name="streamed")
    build_cache(cfg, tmp_path / "cache", progress=False)
    assert ActivationCache(tmp_path / "cache").hookpoints == ["transformer.h.1", "transformer.h.2"]
    train(cfg)
    cached = replace(cfg, run_name="cached", data=replace(cfg.data, activation_cache=str(tmp_path / "cache")))
    train(cached)
    for variant in VARIANTS:
        a = SparseAutoencoder.load(cfg.run_dir / variant.name)
        b = SparseAutoencoder.load(cached.run_dir / variant.name)
        for name, tensor in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], tensor), (variant.name, name)


def test_a_variant_seed_reseeds_its_init_only(tiny_lm_dir, text_file, tmp_path):
    """A variant's `seed` draws another init from the same batches; unset, it is the run's seed."""
    cfg = base_config(tiny_lm_dir, text_file, tmp_path, seed=3, save_every=0, max_tokens=128 * 4,
                      variants=(SaeVariant("default"), SaeVariant("same", seed=3), SaeVariant("other", seed=4)))
    train(cfg)
    default, same, other = (SparseAutoencoder.load(cfg.run_dir / name) for name in ("default", "same", "other"))
    for name, tensor in default.state_dict().items():
        assert torch.equal(same.state_dict()[name], tensor), name
    assert not torch.allclose(other.W_dec, default.W_dec)
    seeds = [json.loads((cfg.run_dir / name / "cfg.json").read_text())["init_seed"] for name in ("default", "same", "other")]
    assert seeds == [3, 3, 4]
