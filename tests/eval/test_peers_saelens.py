"""eval/peers/saelens.py: the exact conversion of SAELens's TopK, BatchTopK and Matryoshka SAEs, its
trainer's checkpoints, and the benchmark's kinds of SAELens systems (eval/peers/__main__.py)."""

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sae_lens")

from sae_lens import SAE  # noqa: E402

from eval.peers import saelens as peer_saelens  # noqa: E402
from eval.peers.__main__ import main, run_config, sae_kind  # noqa: E402
from eval.peers.saelens import new_training_sae, to_our_sae, train_saelens  # noqa: E402
from sae.config import ConfigError  # noqa: E402
from sae.folder import read_sae_metadata  # noqa: E402
from sae.model import SparseAutoencoder  # noqa: E402

D_IN, N_LATENTS, K, BATCH, STEPS = 16, 48, 4, 64, 6


def dense_latents(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Our top-k (values, indices), both (N, k), scattered into (N, n_latents)."""
    return torch.zeros(len(values), n_latents, dtype=values.dtype).scatter_(1, indices, values)


class CountingBatches:
    """Iterator over rows x = sum of 3 of 8 fixed random directions (the same for every seed) with
    random positive weights, (BATCH, D_IN) float32 per batch, as the (inputs, targets) pair of an SAE (one
    tensor twice); counts the batches taken."""

    def __init__(self, seed: int = 0):
        self.directions = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(100))
        self.generator = torch.Generator().manual_seed(seed)
        self.taken = 0

    def __iter__(self) -> "CountingBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.taken += 1
        scores = torch.rand(BATCH, 8, generator=self.generator)
        chosen = scores >= scores.topk(3, dim=1).values[:, -1:]
        weights = torch.rand(BATCH, 8, generator=self.generator) * 2 + 0.5
        rows = (weights * chosen) @ self.directions
        return rows, rows


def train(tmp_path: Path, steps: int, checkpoint_steps: list[int], batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
          **kind) -> dict[int, Path]:
    return train_saelens(batches, steps=steps, batch_size=BATCH, d_in=D_IN, n_latents=N_LATENTS, k=K,
                         checkpoint_steps=checkpoint_steps, out_dir=tmp_path, metadata={"model": "synthetic"}, **kind)


def assert_ours_computes_saelens_inference(ours: SparseAutoencoder, inference: SAE, x: torch.Tensor) -> None:
    """Our encode (scattered dense, (N, n_latents)) and reconstruct of x (N, D_IN) equal SAELens's inference
    SAE's, to float32 rounding; a BatchTopK SAE's threshold is SAELens's, bit for bit."""
    values, indices = ours.encode(x)
    torch.testing.assert_close(dense_latents(values, indices, N_LATENTS), inference.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.reconstruct(x)[0], inference(x), atol=1e-5, rtol=1e-5)
    if ours.threshold is not None:
        assert torch.equal(inference.threshold, ours.threshold.expand(N_LATENTS))


def saelens_inference_sae(saelens_sae, folder: Path) -> SAE:
    """The SAE SAELens itself computes with at inference: its training SAE saved by `save_inference_model`
    and loaded back by `SAE.load_from_disk` (a JumpReLU SAE for BatchTopK and Matryoshka)."""
    saelens_sae.save_inference_model(folder)
    return SAE.load_from_disk(folder)


def randomize(saelens_sae) -> torch.Generator:
    """Random weights and biases, decoder rows of norms from 0.1 to 3.1 (far from unit); returns the
    generator, for the inputs."""
    generator = torch.Generator().manual_seed(4)
    saelens_sae.W_enc.copy_(torch.randn(D_IN, N_LATENTS, generator=generator))
    directions = torch.randn(N_LATENTS, D_IN, generator=generator)
    norms = torch.rand(N_LATENTS, 1, generator=generator) * 3 + 0.1
    saelens_sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True) * norms)
    saelens_sae.b_enc.copy_(torch.randn(N_LATENTS, generator=generator))
    saelens_sae.b_dec.copy_(torch.randn(D_IN, generator=generator))
    return generator


@torch.no_grad()
def test_to_our_sae_matches_saelens_forward_with_non_unit_decoder_and_random_biases():
    saelens_sae = new_training_sae(D_IN, N_LATENTS, K, seed=3)
    generator = randomize(saelens_sae)
    x = torch.randn(256, D_IN, generator=generator) * 2

    ours = to_our_sae(saelens_sae)
    values, indices = ours.encode(x)

    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(N_LATENTS))
    torch.testing.assert_close(dense_latents(values, indices, N_LATENTS), saelens_sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.decode(values, indices), saelens_sae(x), atol=1e-5, rtol=1e-5)


def test_to_our_sae_refuses_a_topk_sae_without_decoder_norm_rescaling():
    saelens_sae = new_training_sae(D_IN, N_LATENTS, K)
    saelens_sae.cfg.rescale_acts_by_decoder_norm = False
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        to_our_sae(saelens_sae)


def test_train_saelens_writes_each_checkpoint_after_exactly_its_steps(tmp_path):
    batches = CountingBatches()
    folders = train(tmp_path / "six", STEPS, [3, STEPS], batches)

    assert batches.taken == STEPS
    assert folders == {3: tmp_path / "six" / "step-00000003", 6: tmp_path / "six" / "step-00000006"}
    for step, folder in folders.items():
        metadata = read_sae_metadata(folder)
        provenance = (metadata["model"], metadata["system"], metadata["tokens_trained"])
        assert provenance == ("synthetic", "saelens", step * BATCH)
        sae = SparseAutoencoder.load(folder)
        assert (sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k) == (D_IN, N_LATENTS, K)
    step_3, step_6 = (load_file(folder / "sae.safetensors") for folder in folders.values())
    assert not torch.equal(step_3["encoder.weight"], step_6["encoder.weight"])

    # A 3-step run on the same batches ends where the 6-step run's step-3 checkpoint is (SAELens's
    # constant schedule does not depend on the total), so that checkpoint is after 3 steps, not 2 or 4.
    three_step_run = load_file(train(tmp_path / "three", 3, [3], CountingBatches())[3] / "sae.safetensors")
    assert all(torch.equal(step_3[name], tensor) for name, tensor in three_step_run.items())


def test_train_saelens_refuses_too_few_batches(tmp_path):
    batches = CountingBatches()
    with pytest.raises(ValueError, match="ran out after 2 of 6"):
        train(tmp_path, STEPS, [STEPS], iter([next(batches), next(batches)]))


@torch.no_grad()
def test_trained_saelens_sae_reconstructs_better_than_its_init(tmp_path):
    folders = train(tmp_path, STEPS, [STEPS], CountingBatches())
    held_out = CountingBatches(seed=1)  # the same directions, other rows
    x = torch.cat([next(held_out)[1] for _ in range(4)])
    init_fvu = to_our_sae(new_training_sae(D_IN, N_LATENTS, K)).forward(x).fvu
    trained_fvu = SparseAutoencoder.load(folders[STEPS]).forward(x).fvu
    assert trained_fvu < init_fvu


@torch.no_grad()
@pytest.mark.parametrize("matryoshka", [(), (8, 24)])
def test_to_our_batchtopk_sae_computes_saelens_inference_jumprelu_with_non_unit_decoder(tmp_path, matryoshka):
    """Random weights, decoder norms far from 1 and a threshold that keeps a few latents per row: the
    threshold is in the units of the pre-activations times the decoder norms, as ours after the fold."""
    saelens_sae = new_training_sae(D_IN, N_LATENTS, K, seed=3, activation="batchtopk", matryoshka=matryoshka)
    generator = randomize(saelens_sae)
    saelens_sae.topk_threshold.fill_(9.7)
    x = torch.randn(256, D_IN, generator=generator) * 2

    ours = to_our_sae(saelens_sae)
    inference = saelens_inference_sae(saelens_sae, tmp_path / "saelens")

    assert (ours.cfg.activation, ours.cfg.matryoshka, ours.cfg.k) == ("batchtopk", matryoshka, K)
    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(N_LATENTS))
    assert_ours_computes_saelens_inference(ours, inference, x)
    l0 = (inference.encode(x) > 0).sum(dim=1).float()
    assert 1 < l0.mean() < N_LATENTS / 4 and l0.min() < l0.max()  # the threshold decides, per row


@pytest.mark.parametrize("matryoshka", [(), (8, 24)])
def test_trained_batchtopk_and_matryoshka_folders_compute_saelens_inference_sae(tmp_path, monkeypatch, matryoshka):
    """A few SAELens BatchTopK (or Matryoshka) training steps through the peer trainer: each folder
    written computes what SAELens's inference SAE of that very checkpoint computes, on fresh rows."""
    inference_folders = {}

    def converted_and_saved_by_saelens(saelens_sae):
        ours = to_our_sae(saelens_sae)
        inference_folders[len(inference_folders)] = tmp_path / f"saelens-{len(inference_folders)}"
        saelens_sae.save_inference_model(inference_folders[len(inference_folders) - 1])
        return ours

    monkeypatch.setattr(peer_saelens, "to_our_sae", converted_and_saved_by_saelens)
    batches = CountingBatches()
    folders = train(tmp_path / "run", STEPS, [3, STEPS], batches, activation="batchtopk", matryoshka=matryoshka)
    assert batches.taken == STEPS and len(inference_folders) == 2

    held_out = CountingBatches(seed=1)
    x = torch.cat([next(held_out)[1] + 0.1 * torch.randn(BATCH, D_IN) for _ in range(2)])
    thresholds = []
    for folder, inference_folder in zip(folders.values(), inference_folders.values()):
        ours = SparseAutoencoder.load(folder)
        assert (ours.cfg.activation, ours.cfg.matryoshka) == ("batchtopk", matryoshka)
        with torch.no_grad():
            assert_ours_computes_saelens_inference(ours, SAE.load_from_disk(inference_folder), x)
        thresholds.append(ours.threshold.item())
    assert 0 < thresholds[0] < thresholds[1]  # the running average of kept values, from 0, after 3 and 6 steps


def test_sae_kind_keeps_the_records_of_plain_and_transcoder_runs_and_parses_the_new_kinds(train_config):
    """A plain or transcoder run's task record is what it was before BatchTopK (its earlier runs are
    reused); the new kinds parse for ours and SAELens, the prefixes as the JSON record reads back."""
    def kind(system: str) -> dict:
        return sae_kind(run_config(str(train_config), system, "transformer.h.1", 4, 256, Path("cache")).sae)

    assert kind("saelens") == {} and kind("sparsify --sae.transcode") == {"transcode": True}
    assert kind("ours --sae.activation=batchtopk") == {"activation": "batchtopk"}
    new_kinds = {"activation": "batchtopk", "matryoshka": [8, 24]}
    assert kind("saelens --sae.activation=batchtopk --sae.matryoshka=[8,24]") == new_kinds
    assert kind("ours --sae.activation=batchtopk --sae.matryoshka=[8,24]") == json.loads(json.dumps(new_kinds))


@pytest.mark.parametrize("system, message", [
    ("saelens --sae.matryoshka=[8,24]", "saelens's trainer trains matryoshka=[8,24] only with activation=batchtopk"),
    ("sparsify --sae.activation=batchtopk", "sparsify's trainer has no activation=batchtopk"),
    ("sparsify --sae.activation=batchtopk --sae.matryoshka=[8,24]",
     "sparsify's trainer has no activation=batchtopk, matryoshka=[8,24]"),
])
def test_a_kind_a_peer_does_not_train_is_refused_in_one_line_before_any_work(train_config, tmp_path, system, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        main(["--train_config", str(train_config), "--systems", json.dumps([system]), "--out", str(tmp_path / "peers")])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "peers").exists()


def test_saelens_matryoshka_without_batchtopk_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="Matryoshka SAE is BatchTopK inside") as error:
        new_training_sae(D_IN, N_LATENTS, K, matryoshka=(8, 24))
    assert "\n" not in str(error.value)


def test_benchmark_trains_saelens_matryoshka_batchtopk_scores_it_and_reuses_the_run(train_config, tmp_path):
    system = "saelens --sae.activation=batchtopk --sae.matryoshka=[8,24]"
    args = ["--train_config", str(train_config), "--systems", json.dumps([system]), "--tokens", "256",
            "--checkpoint_tokens", "128", "--eval_tokens", "240", "--dead_window_tokens", "0", "--out", str(tmp_path)]
    rows = main(args)
    assert [(row["system"], row["tokens"]) for row in rows] == [(system, 128), (system, 256)]
    for row in rows:
        sae = SparseAutoencoder.load(row["sae"])
        assert (sae.cfg.activation, sae.cfg.matryoshka, sae.cfg.k) == ("batchtopk", (8, 24), 4)
        assert all(torch.isfinite(torch.tensor(row[key])) for key in ("fvu", "delta_ce", "kl", "l0"))
    record = next(tmp_path.rglob("run.json"))
    trained = record.stat().st_mtime_ns
    assert [row["fvu"] for row in main(args)] == [row["fvu"] for row in rows]
    assert record.stat().st_mtime_ns == trained  # the same task read back from JSON: reused, not retrained
