"""Config: YAML + command line, the sweep agent's --key=value form, and errors that name the key."""

from dataclasses import replace
from pathlib import Path

import pytest

from sae.config import ConfigError, TrainConfig, load_config, parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_is_the_built_in_default():
    assert load_config(CONFIGS / "default.yaml") == TrainConfig()
    assert parse_args([]) == TrainConfig()


def test_gpt2_small_config():
    cfg = load_config(CONFIGS / "gpt2-small.yaml")
    assert (cfg.model, cfg.hookpoint, cfg.sae.n_latents, cfg.sae.k, cfg.data.ctx_len) == (
        "gpt2", "transformer.h.8", 32768, 32, 64)


def test_overrides_in_every_form():
    cfg = parse_args([
        "--config", str(CONFIGS / "default.yaml"),
        "--sae.k=64", "--sae.n_latents", "4096", "--lr=3e-4", "--max_tokens=1e6",
        "--resume", "--data.dataset", "some/hub-set", "--run-name", "x", "--sae.multi_topk=true",
    ])
    assert cfg.sae.k == 64 and cfg.sae.n_latents == 4096 and cfg.lr == 3e-4
    assert cfg.max_tokens == 1_000_000 and isinstance(cfg.max_tokens, int)
    assert cfg.resume is True and cfg.sae.multi_topk is True
    assert cfg.data.dataset == "some/hub-set" and cfg.run_name == "x"
    assert cfg.sae.k_aux == 256  # untouched keys keep the file's values
    # Overrides win even when given before --config.
    assert parse_args(["--sae.k=8", "--config", str(CONFIGS / "default.yaml")]).sae.k == 8
    assert parse_args(["--lr=null"]).lr is None


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.kk'.*k_aux"):
        parse_args(["--sae.kk=3"])
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        parse_args(["--learning_rate", "1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'sae.k' expects int, got 'many'"):
        parse_args(["--sae.k=many"])
    with pytest.raises(ConfigError, match=r"'batch_size' expects int, got 1.5"):
        parse_args(["--batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"'wandb_mode' expects one of \['online', 'offline', 'disabled'\]"):
        parse_args(["--wandb_mode=cloud"])
    with pytest.raises(ConfigError, match=r"'resume' expects bool"):
        parse_args(["--resume=maybe"])
    with pytest.raises(ConfigError, match="k=99999 exceeds"):
        parse_args(["--sae.k=99999"])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae:\n  k: 8\n  widht: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'sae.widht'"):
        load_config(bad)


def test_a_partial_sae_section_changes_only_its_keys(tmp_path):
    """`--sae.n_latents 4096` alone used to build SaeConfig's class defaults (k=32, k_aux=512,
    dead_tokens=10M) instead of the default run's SAE (k=16, k_aux=256, dead_tokens=20k)."""
    default = TrainConfig().sae
    from_flag = parse_args(["--sae.n_latents", "4096"]).sae
    assert from_flag == replace(default, n_latents=4096)
    partial = tmp_path / "partial.yaml"
    partial.write_text("sae:\n  k: 8\n")
    assert parse_args(["--config", str(partial)]).sae == replace(default, k=8)
    assert parse_args(["--config", str(partial), "--sae.k_aux", "64"]).sae == replace(default, k=8, k_aux=64)


def test_fewer_tokens_than_one_batch_is_refused():
    """It used to exit 0 having saved an untrained SAE."""
    with pytest.raises(ConfigError, match=r"max_tokens \(1,000\) is less than one batch \(batch_size 4,096\)"):
        parse_args(["--max_tokens", "1000"])
    assert parse_args(["--max_tokens", "4096"]).max_tokens == 4096


def test_max_tokens_is_rounded_down_to_whole_batches_and_left_as_given():
    cfg = parse_args(["--max_tokens", "10000", "--batch_size", "4096"])
    assert cfg.total_steps == 2 and cfg.max_tokens == 10_000  # the trainer says so (tests/test_disk.py)
    assert TrainConfig(max_tokens=4096, batch_size=4096).total_steps == 1


def test_a_random_init_lm_is_recorded_and_named_apart_from_its_pretrained_twin():
    pretrained, random_lm = TrainConfig(), TrainConfig(model_init="random", model_init_seed=5)
    assert "model_init" not in pretrained.provenance("transformer.h.2")
    record = random_lm.provenance("transformer.h.2")
    assert record["model_init"] == "random" and record["model_init_seed"] == 5 and record["model"] == pretrained.model
    assert pretrained.model_identity == pretrained.model  # activation caches of pretrained LMs keep their identity
    assert random_lm.model_identity != pretrained.model_identity != TrainConfig(model_init="random").model_identity
    with pytest.raises(ConfigError, match="model_init"):
        parse_args(["--model_init", "shuffled"], TrainConfig)


def test_the_scaling_sweep_config_is_twelve_widths_and_ks_of_the_default():
    cfg = load_config(CONFIGS / "scaling-sweep.yaml")
    assert {(variant.n_latents, variant.k) for variant in cfg.variants} == {(n, k) for n in (128, 256, 512, 1024) for k in (4, 8, 16)}
    assert cfg.model == TrainConfig().model and cfg.hookpoint == TrainConfig().hookpoint and cfg.max_tokens == 1_000_000


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml") if not path.name.startswith("sweep-")))
def test_every_shipped_run_config_loads_and_builds_its_members(name):
    """A config in configs/ that no longer parses (a renamed key, a bad value) fails here, not in a user's run.
    The wandb sweep files (sweep-*.yaml) are wandb's format, not ours."""
    cfg = load_config(CONFIGS / name)
    assert cfg.member_configs()
