"""python -m eval.peers on transcoders: ours and sparsify's transcoder trainer (with and without its skip
connection) train on the same (MLP input, MLP output) rows for the same tokens, and every checkpoint is
scored by splicing the transcoder in place of the MLP's output."""

import json
from pathlib import Path

import pytest
import torch

from eval.peers.__main__ import main
from eval.peers.rows import shared_batches
from sae.cache import ActivationCache
from sae.config import ConfigError, parse_args
from sae.folder import read_sae_config
from sae.model import SparseAutoencoder

pytest.importorskip("sparsify")

HOOKPOINT = "transformer.h.1.mlp"
SYSTEMS = ["ours --sae.transcode", "ours --sae.transcode --sae.skip_connection", "sparsify --sae.transcode",
           "sparsify --sae.transcode --sae.skip_connection"]


def test_transcoders_train_on_the_same_mlp_rows_for_equal_tokens_and_are_scored_at_every_checkpoint(
        train_config, tmp_path, monkeypatch):
    from sparsify import SparseCoder

    fed, forward = [], SparseCoder.forward

    def recording_forward(self, x, y=None, **kwargs):
        fed.append((self.cfg.transcode, self.W_skip is not None, x.detach().clone(), y.detach().clone()))
        return forward(self, x, y, **kwargs)

    monkeypatch.setattr(SparseCoder, "forward", recording_forward)
    out = tmp_path / "peers"
    rows = main(["--train_config", str(train_config), "--hookpoints", f"[{HOOKPOINT}]", "--systems", json.dumps(SYSTEMS),
                 "--peer_lr_factors", "[4]", "--tokens", str(128 * 2), "--checkpoint_tokens", "128",
                 "--eval_tokens", "240", "--out", str(out)])
    systems = [*SYSTEMS[:3], "sparsify --sae.transcode --lr_factor=4", SYSTEMS[3],
               "sparsify --sae.transcode --sae.skip_connection --lr_factor=4"]
    assert [(row["system"], row["tokens"]) for row in rows] == [(s, t) for s in systems for t in (128, 256)]
    for row in rows:
        cfg = read_sae_config(row["sae"])
        assert cfg.transcode and cfg.skip_connection == ("skip_connection" in row["system"]), row["system"]
        assert json.loads((Path(row["sae"]) / "cfg.json").read_text())["tokens_trained"] == row["tokens"]
        assert all(torch.isfinite(torch.tensor(row[key])) for key in ("fvu", "delta_ce", "kl", "dead_window"))
        assert row["l0"] <= 4 and row["held_out"] == "split 'test' (as asked)"
    # each sparsify kind has its own learning rate tuned on validation
    assert sum(row["tuned"] for row in rows if row["final"]) == 2
    assert {row["system"].split(" --lr")[0] for row in rows if row["tuned"]} == set(SYSTEMS[2:])

    # sparsify was fed the MLP's (input, output) pairs in our trainer's order, with and without its skip
    trained = [(skip, x, y) for transcode, skip, x, y in fed if transcode and len(x) == 128]
    assert len(trained) == 4 * 2 and {skip for skip, _, _ in trained} == {False, True}
    cfg = parse_args(["--config", str(train_config), "--hookpoint", HOOKPOINT, "--sae.transcode"])
    first = next(shared_batches(out / "cache", HOOKPOINT, cfg))
    for skip, x, y in trained[::2]:  # each run's first batch
        assert torch.equal(x, first[0]) and torch.equal(y, first[1]) and not torch.equal(x, y)
    cache = ActivationCache(out / "cache")
    assert cache.hookpoints == [f"{HOOKPOINT}:input", HOOKPOINT]
    report = (out / "report.md").read_text()
    assert f"| {HOOKPOINT} | 4 | sparsify --sae.transcode --sae.skip_connection" in report


@pytest.mark.parametrize("system, message", [
    ("saelens --sae.transcode", "saelens's trainer has no transcode"),
    ("sparsify --sae.k=8", "only 'ours' takes other config overrides"),
    ("sparsify --sae.transcode --lr_factor=1 --lr_factor=2", "a peer takes one --lr_factor=F"),
])
def test_a_peer_is_refused_a_kind_its_trainer_does_not_train_before_any_work(train_config, tmp_path, system, message):
    with pytest.raises(ConfigError, match=message) as error:
        main(["--train_config", str(train_config), "--hookpoints", f"[{HOOKPOINT}]", "--systems", f"[{system}]",
              "--out", str(tmp_path / "peers")])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "peers").exists()


def test_sparsify_trains_a_transcoder_on_the_inputs_and_predicts_the_targets(tmp_path):
    """Targets an exact linear map of the inputs: the skip transcoder's W_skip learns it, so its folder
    predicts the targets from the inputs far better than from the targets themselves."""
    from eval.peers.sparsify_trainer import train_sparsify

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(12, 64, 16, generator=generator)
    mixing = torch.randn(16, 16, generator=generator)
    targets = inputs @ mixing.T
    folders = train_sparsify(iter(zip(inputs, targets)), 12, 64, 16, 48, 4, [12], tmp_path / "run", {"model": "m"},
                             transcode=True, skip_connection=True)
    transcoder = SparseAutoencoder.load(folders[12])
    assert transcoder.cfg.transcode and transcoder.cfg.skip_connection
    x, y = inputs.flatten(0, 1), targets.flatten(0, 1)
    assert transcoder(x, target=y).fvu < 0.5 * transcoder(y, target=y).fvu
