"""python -m eval.peers: every system trains on the batches our trainer reads, is saved at each
checkpoint as the state after exactly that many steps, and is scored on one held-out text."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from eval.__main__ import EvalConfig, run_eval
from eval.peers.__main__ import main, markdown_table
from eval.peers.ours import train_ours
from eval.peers.rows import shared_batches
from sae.activations import ActivationStream
from sae.cache import ActivationCache, build_cache
from sae.config import ConfigError, parse_args

pytest.importorskip("sparsify")
pytest.importorskip("sae_lens")


def test_every_system_is_scored_at_every_checkpoint_on_one_held_out_text(train_config, tmp_path):
    systems = ["ours", "ours --grad_clip=0 --lr=0.01", "sparsify", "saelens"]
    argv = ["--train_config", str(train_config), "--systems", json.dumps(systems), "--tokens", str(128 * 6),
            "--checkpoint_tokens", str(128 * 3), "--eval_tokens", "480", "--out", str(tmp_path / "peers")]
    rows = main(argv)
    assert [(row["system"], row["tokens"]) for row in rows] == [(s, t) for s in systems for t in (384, 768)]
    assert {row["held_out"] for row in rows} == {"split 'test' (as asked)"}  # the split nothing is tuned on
    for row in rows:
        assert all(torch.isfinite(torch.tensor(row[key])) for key in ("fvu", "delta_ce", "kl")), row
        assert row["l0"] <= 4 and 0 <= row["never_fired_frac"] <= 1 and 0 <= row["dead_window"] <= 1
        assert row["never_fired_tokens"] == rows[0]["never_fired_tokens"] > 0 and "dead_frac" not in row
    assert {row["dead_window_tokens"] for row in rows} == {ActivationCache(tmp_path / "peers" / "cache").n_tokens}
    fvu = {(row["system"], row["tokens"]): row["fvu"] for row in rows}
    assert fvu[("ours", 768)] != fvu[("ours --grad_clip=0 --lr=0.01", 768)]  # the overrides took effect
    report = (tmp_path / "peers" / "report.md").read_text()
    assert "| transformer.h.1 | 4 | sparsify | 768 |" in report and f"| never fired ({rows[0]['never_fired_tokens']:,} held-out tokens) | dead (" in report

    runs = {(row["system"], row["tokens"]): row["wall_s"] for row in rows}
    again = main(argv)  # trained runs are reused, not retrained
    assert {(row["system"], row["tokens"]): row["wall_s"] for row in again} == runs

    # a changed config of ours (a new default, say) retrains ours; the peers' task is the same, so they are reused
    config = yaml.safe_load(train_config.read_text())
    train_config.write_text(yaml.safe_dump({**config, "lr": 0.02}))
    changed = {(row["system"], row["tokens"]): row["wall_s"] for row in main(argv)}
    assert all(changed[key] != runs[key] for key in runs if key[0] == "ours")
    assert all(changed[key] == runs[key] for key in runs if key[0] in ("sparsify", "saelens"))


def test_the_table_names_the_held_out_never_fired_fraction_and_its_tokens():
    row = {"hookpoint": "h", "k": 4, "system": "ours", "tokens": 768, "fvu": 0.5, "delta_ce": 0.1, "kl": 0.2,
           "never_fired_frac": 0.25, "never_fired_tokens": 16384, "l0": 4.0, "final": True, "wall_s": 3.0,
           "cpu_s": 5.0, "dead_window": 0.125, "dead_window_tokens": 1000}
    header, _, line = markdown_table([row]).splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert columns[7:9] == ["never fired (16,384 held-out tokens)", "dead (1,000 train tokens)"]
    assert cells[7:9] == ["0.250", "0.125"] and len(cells) == len(columns)


def test_a_run_that_is_not_a_whole_number_of_checkpoints_is_scored_at_its_end_too(train_config, tmp_path):
    """7 steps with a checkpoint every 3: folders after 3, 6 and 7 steps (a batch of 16384 over 1M tokens
    is 61 steps, checkpoints every 30)."""
    argv = ["--train_config", str(train_config), "--systems", "[ours, sparsify]", "--tokens", str(128 * 7),
            "--checkpoint_tokens", str(128 * 3), "--eval_tokens", "480", "--dead_window_tokens", "0",
            "--out", str(tmp_path / "peers")]
    rows = main(argv)
    assert not any("dead_window" in row for row in rows)
    assert "train tokens" not in (tmp_path / "peers" / "report.md").read_text()
    assert [(row["system"], row["tokens"]) for row in rows] == [(s, 128 * n) for s in ("ours", "sparsify") for n in (3, 6, 7)]
    assert len({row["fvu"] for row in rows if row["system"] == "ours"}) == 3


def test_peers_tuned_on_validation_are_marked_and_scored_on_test(train_config, tmp_path):
    argv = ["--train_config", str(train_config), "--systems", "[ours, saelens]", "--peer_lr_factors", "[0.25, 16]",
            "--tokens", str(128 * 4), "--checkpoint_tokens", str(128 * 4), "--eval_tokens", "480",
            "--dead_window_tokens", "0", "--out", str(tmp_path / "peers")]
    rows = main(argv)
    systems = ["ours", "saelens", "saelens --lr_factor=0.25", "saelens --lr_factor=16"]
    assert [row["system"] for row in rows] == systems
    assert len({row["fvu"] for row in rows}) == 4  # the factors took effect
    validation = {report["sae"]: report["fvu"] for report in
                  run_eval(EvalConfig(tokens=480, split="validation"), [row["sae"] for row in rows[1:]])}
    best = min(rows[1:], key=lambda row: validation[row["sae"]])
    assert [row["tuned"] for row in rows] == [row is best for row in rows]
    assert f"| {best['system']} (tuned) |" in (tmp_path / "peers" / "report.md").read_text()
    assert {row["held_out"] for row in rows} == {"split 'test' (as asked)"}


def test_a_bad_system_is_refused_before_any_work(train_config, tmp_path):
    with pytest.raises(ConfigError, match="unknown system 'sparsfy'"):
        main(["--train_config", str(train_config), "--systems", "[ours, sparsfy]", "--out", str(tmp_path / "peers")])
    with pytest.raises(ConfigError, match="only 'ours' takes other config overrides"):
        main(["--train_config", str(train_config), "--systems", "[sparsify --lr=1]", "--out", str(tmp_path / "peers")])
    with pytest.raises(ConfigError, match="a peer takes one --lr_factor=F with F > 0"):
        main(["--train_config", str(train_config), "--systems", "[sparsify --lr_factor=0]", "--out", str(tmp_path / "peers")])
    with pytest.raises(ConfigError, match="--peer_lr_factors must all be > 0"):
        main(["--train_config", str(train_config), "--peer_lr_factors", "[-1]", "--out", str(tmp_path / "peers")])
    with pytest.raises(ConfigError, match="--dead_window_tokens must be >= 0"):
        main(["--train_config", str(train_config), "--dead_window_tokens", "-1", "--out", str(tmp_path / "peers")])
    assert not (tmp_path / "peers").exists()


@pytest.mark.parametrize("kind", [[], ["--sae.transcode", "--sae.skip_connection"]], ids=["sae", "skip_transcoder"])
def test_peers_read_exactly_the_batches_our_trainer_trains_on(train_config, tmp_path, monkeypatch, kind):
    """An SAE's peers get (rows, the same rows); a transcoder's (its MLP's inputs, its outputs), as ours reads them."""
    hookpoint = "transformer.h.1.mlp" if kind else "transformer.h.1"
    argv = ["--config", str(train_config), "--max_tokens", str(128 * 6), "--hookpoint", hookpoint, *kind]
    cfg = parse_args(argv)
    build_cache(cfg, tmp_path / "cache", progress=False)
    cfg = parse_args([*argv, "--data.activation_cache", str(tmp_path / "cache")])
    trained_on, next_batch = [], ActivationStream.__next__

    def recording_next(self):
        batch = next_batch(self)
        trained_on.append((batch[cfg.hookpoints[0]], batch[hookpoint]))
        return batch

    monkeypatch.setattr(ActivationStream, "__next__", recording_next)
    folders = train_ours(cfg, [3, 6], tmp_path / "ours", {"model": "m"})
    monkeypatch.undo()
    assert sorted(folders) == [3, 6] and len(trained_on) == 6
    peers = shared_batches(tmp_path / "cache", hookpoint, cfg)
    for inputs, targets in trained_on:
        peer_inputs, peer_targets = next(peers)
        assert torch.equal(peer_inputs, inputs) and torch.equal(peer_targets, targets)
        assert torch.equal(inputs, targets) != bool(kind)  # a transcoder reads its MLP's input, not its output
    # the exported last checkpoint is the trainer's own final SAE folder (a transcoder's: both scales folded)
    final = load_file(tmp_path / "ours" / "run" / hookpoint / "sae.safetensors")
    exported = load_file(folders[6] / "sae.safetensors")
    assert final.keys() == exported.keys() and all(torch.equal(final[name], exported[name]) for name in final)


def test_a_sparsify_checkpoint_is_the_state_after_that_many_steps(tmp_path):
    from eval.peers.sparsify_trainer import train_sparsify

    generator = torch.Generator().manual_seed(0)
    batches = torch.randn(4, 64, 16, generator=generator) * torch.linspace(0.1, 3, 16)

    def run(steps, checkpoints, out):
        return train_sparsify(iter(zip(batches, batches)), steps, 64, 16, 48, 4, checkpoints, tmp_path / out, {"model": "m"})

    long_run, short_run = run(4, [2, 4], "long"), run(2, [2], "short")
    assert sorted(long_run) == [2, 4] and sorted(short_run) == [2]
    at_two, short = load_file(long_run[2] / "sae.safetensors"), load_file(short_run[2] / "sae.safetensors")
    for name in short:  # equal up to rounding (sparsify renormalises W_dec around its own saves)
        torch.testing.assert_close(at_two[name], short[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(at_two["W_dec"], load_file(long_run[4] / "sae.safetensors")["W_dec"])
    assert json.loads((long_run[4] / "cfg.json").read_text())["tokens_trained"] == 4 * 64


def test_a_sparsify_learning_rate_factor_scales_the_rate_its_trainer_chose(tmp_path, monkeypatch):
    import sparsify

    from eval.peers import sparsify_trainer

    rates = []
    fit = sparsify.Trainer.fit

    def recording_fit(self):
        rates.append(sorted({group["lr"] for optimizer in self.optimizers for group in optimizer.param_groups}))
        return fit(self)

    monkeypatch.setattr(sparsify.Trainer, "fit", recording_fit)
    batches = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    for factor in (1.0, 4.0):
        sparsify_trainer.train_sparsify(iter(zip(batches, batches)), 2, 64, 16, 48, 4, [2], tmp_path / f"x{factor}", {"model": "m"},
                                        lr_factor=factor)
    assert len(rates[0]) == 1 and rates[1] == [4.0 * rates[0][0]]


def test_our_final_saes_are_also_fine_tuned_and_the_fronts_drawn(train_config, tmp_path):
    """--finetune_tokens adds "SYSTEM +finetune" rows: the final SAE fine-tuned end to end from that folder,
    its tokens counting both phases, reused on a second call; with two ks the fronts are drawn."""
    argv = ["--train_config", str(train_config), "--systems", "[ours, sparsify]", "--ks", "[2, 4]",
            "--tokens", str(128 * 4), "--checkpoint_tokens", str(128 * 4), "--eval_tokens", "480",
            "--dead_window_tokens", "0", "--finetune_tokens", str(32 * 16), "--out", str(tmp_path / "peers")]
    rows = main(argv)
    assert [(row["k"], row["system"], row["tokens"]) for row in rows] == [
        (2, "ours", 512), (2, "sparsify", 512), (4, "ours", 512), (4, "sparsify", 512),
        (2, "ours +finetune", 1024), (4, "ours +finetune", 1024)]
    for k in (2, 4):
        [final] = [row for row in rows if row["k"] == k and row["system"] == "ours"]
        [tuned] = [row for row in rows if row["k"] == k and row["system"] == "ours +finetune"]
        record = json.loads((tmp_path / "peers" / "transformer.h.1" / f"k{k}" / "ours" / "finetune-512" / "transformer.h.1"
                             / "cfg.json").read_text())["finetune"]
        assert record["source"] == str(Path(final["sae"]).resolve()) and tuned["final"]
        assert tuned["fvu"] != final["fvu"]
    assert (tmp_path / "peers" / "fronts-transformer.h.1-fvu.svg").is_file()  # delta CE may be < 0 on this LM
    again = main(argv)
    assert [row["wall_s"] for row in again] == [row["wall_s"] for row in rows]


def test_a_config_key_that_does_not_change_training_does_not_retrain_a_recorded_run():
    from eval.peers.__main__ import same_run

    now = {"system": "ours", "config": {"lr": 0.01}, "lr": 0.01, "checkpoint_steps": [3]}
    assert same_run({**now, "config": {"lr": 0.01, "finetune_tokens": 0}}, now)  # recorded after the key existed
    assert same_run(now, now) and not same_run(None, now)
    assert not same_run({**now, "config": {"lr": 0.02, "finetune_tokens": 0}}, now)
    peer = {"system": "sparsify", "task": {"k": 4}, "checkpoint_steps": [3], "lr_factor": 1.0}
    assert same_run(dict(peer), peer) and not same_run({**peer, "lr_factor": 4.0}, peer)


def test_with_seeds_every_run_is_trained_per_seed_and_differences_are_stated_against_seed_noise(train_config, tmp_path):
    """--seeds trains each system once per seed (the config's seed in the folder it always had), and adds each
    metric's mean and 95% interval and which differences exceed seed noise."""
    argv = ["--train_config", str(train_config), "--systems", "[ours, sparsify]", "--seeds", "[0, 1]",
            "--tokens", str(128 * 4), "--checkpoint_tokens", str(128 * 4), "--eval_tokens", "480",
            "--dead_window_tokens", "0", "--out", str(tmp_path / "peers")]
    rows = main(argv)
    assert [(row["system"], row["seed"]) for row in rows] == [("ours", 0), ("sparsify", 0), ("ours", 1), ("sparsify", 1)]
    k_dir = tmp_path / "peers" / "transformer.h.1" / "k4"
    assert sorted(path.name for path in k_dir.iterdir()) == ["ours", "ours-seed1", "sparsify", "sparsify-seed1"]
    assert json.loads((k_dir / "sparsify-seed1" / "run.json").read_text())["identity"]["task"]["seed"] == 1
    assert len({row["fvu"] for row in rows}) == 4
    seeds = json.loads((tmp_path / "peers" / "seeds.json").read_text())
    ours = seeds["summary"][0]
    assert (ours["system"], ours["seeds"]) == ("ours", [0, 1])
    assert ours["fvu"]["values"] == [rows[0]["fvu"], rows[2]["fvu"]]
    [fvu_line, delta_ce_line] = seeds["comparisons"]
    assert fvu_line.startswith("transformer.h.1 k=4: ours") and "sparsify" in fvu_line and "fvu" in fvu_line
    assert "delta_ce" in delta_ce_line
    report = (tmp_path / "peers" / "report.md").read_text()
    assert "| transformer.h.1 | 4 | ours | 1 | 512 |" in report and "| transformer.h.1 | 4 | ours | 2 | " in report
