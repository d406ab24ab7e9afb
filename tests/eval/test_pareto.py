"""python -m eval.pareto: every family x k x seed trained as variants of one stream, each SAE the one a
lone run of it trains, scored in one pass, summarised as means with 95% intervals, and reused."""

import json

import pytest
from eval.__main__ import EvalConfig, run_eval
from eval.pareto import main, sweep_config, ParetoConfig
from eval.seeds import mean_interval
from sae.config import ConfigError


def argv(train_config, out, *more):
    return ["--train_config", str(train_config), "--ks", "[2, 4]", "--seeds", "[0, 1]", "--tokens", str(128 * 4),
            "--eval.tokens", "480", "--out", str(out), *more]


def test_the_sweep_is_summarised_over_seeds_and_families_compared(train_config, tmp_path):
    out = tmp_path / "pareto"
    result = main(argv(train_config, out, "--families", '["", "activation=batchtopk"]'))
    saes = result["saes"]
    assert [(row["system"], row["k"], row["seed"]) for row in saes] == [
        (family, k, seed) for family in ("config", "activation=batchtopk") for k in (2, 4) for seed in (0, 1)]
    assert len({row["fvu"] for row in saes}) == 8  # every seed is another SAE
    # the summary is the seeds' mean and Student's t interval of the scored SAEs
    reports = {report["sae"]: report for report in run_eval(EvalConfig(tokens=480, split="test"), [row["sae"] for row in saes])}
    entry = result["summary"][1]
    assert (entry["system"], entry["k"], entry["seeds"]) == ("config", 4, [0, 1])
    expected = mean_interval([reports[row["sae"]]["fvu"] for row in saes[2:4]])
    assert entry["fvu"]["mean"] == pytest.approx(expected.mean) and entry["fvu"]["half_width"] == pytest.approx(expected.half_width)
    assert {"delta_ce", "kl", "l0", "never_fired_frac", "dense_frac"} <= set(entry)
    assert [line.split(":")[0] for line in result["comparisons"]] == ["k=2", "k=2", "k=4", "k=4"]
    report = (out / "report.md").read_text()
    assert "| config | 4 | 2 |" in report and " ± " in report and "split 'test'" in report
    assert (out / "fronts-transformer.h.1-fvu.svg").is_file()
    assert len(json.loads((out / "reports.json").read_text())) == 8

    again = main(argv(train_config, out, "--families", '["", "activation=batchtopk"]'))  # reused, not retrained
    assert again["train_wall_s"] == result["train_wall_s"] and again["saes"] == saes


def test_the_run_is_the_config_with_its_overrides_and_one_variant_per_family_k_and_seed(train_config, tmp_path):
    cfg = ParetoConfig(train_config=str(train_config), overrides=("--lr=0.01",), ks=(4, 8), seeds=(5,),
                       families=("", "n_latents=128 lr=0.02"), tokens=128 * 3, out=str(tmp_path / "p"))
    sweep = sweep_config(cfg)
    assert (sweep.lr, sweep.max_tokens, sweep.eval_every, sweep.run_dir) == (0.01, 384, 0, tmp_path / "p" / "run")
    assert [(variant.name, variant.k, variant.seed, variant.n_latents, variant.lr) for variant in sweep.variants] == [
        ("config-k4-seed5", 4, 5, None, None), ("config-k8-seed5", 8, 5, None, None),
        ("n_latents=128_lr=0.02-k4-seed5", 4, 5, 128, 0.02), ("n_latents=128_lr=0.02-k8-seed5", 8, 5, 128, 0.02)]
    variants_config = tmp_path / "variants.yaml"
    variants_config.write_text(train_config.read_text() + "variants:\n  - {name: a, k: 2}\n")
    with pytest.raises(ConfigError, match="has variants"):
        sweep_config(ParetoConfig(train_config=str(variants_config)))


def test_bad_options_are_one_line(train_config, tmp_path):
    for setting in ("k=8", "seed=1", "activation"):
        with pytest.raises(ConfigError, match="name, k, seed and hookpoint are the sweep's"):
            main(argv(train_config, tmp_path / "p", "--families", json.dumps([setting])))
    with pytest.raises(ConfigError, match="must not repeat"):
        main(argv(train_config, tmp_path / "p", "--seeds", "[1, 1]"))
    with pytest.raises(ConfigError, match="--eval.out is not used"):
        main(argv(train_config, tmp_path / "p", "--eval.out", "x.json"))
    with pytest.raises(ConfigError, match="family.activaton"):
        main(argv(train_config, tmp_path / "p", "--families", '["activaton=batchtopk"]'))


def test_a_stopped_run_is_resumed_and_a_changed_config_retrained(train_config, tmp_path, monkeypatch):
    import eval.pareto as pareto_module

    cfg = ParetoConfig(train_config=str(train_config), ks=(4,), seeds=(0,), tokens=128 * 3, out=str(tmp_path / "p"))
    sweep = sweep_config(cfg)
    calls = []

    def stopped(run_cfg):
        calls.append(run_cfg.resume)
        run_cfg.run_dir.mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(pareto_module, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        pareto_module.train_sweep(sweep, tmp_path / "p")
    monkeypatch.setattr(pareto_module, "train", lambda run_cfg: calls.append(run_cfg.resume))
    pareto_module.train_sweep(sweep, tmp_path / "p")  # the same config: resumed
    assert calls == [False, True]
    assert pareto_module.train_sweep(sweep, tmp_path / "p")["done"] and calls == [False, True]  # done: reused
    other = sweep_config(ParetoConfig(train_config=str(train_config), ks=(4,), seeds=(1,), tokens=128 * 3,
                                      out=str(tmp_path / "p")))
    pareto_module.train_sweep(other, tmp_path / "p")  # another config: its old run folder goes, a fresh start
    assert calls == [False, True, False] and not sweep.run_dir.exists()
