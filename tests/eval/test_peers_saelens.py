"""eval/peers/saelens.py: the exact conversion of SAELens's TopK SAE, and its trainer's checkpoints."""

from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sae_lens")

from eval.peers.saelens import new_topk_training_sae, to_our_sae, train_saelens  # noqa: E402
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


def train(tmp_path: Path, steps: int, checkpoint_steps: list[int], batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, Path]:
    return train_saelens(batches, steps=steps, batch_size=BATCH, d_in=D_IN, n_latents=N_LATENTS, k=K,
                         checkpoint_steps=checkpoint_steps, out_dir=tmp_path, metadata={"model": "synthetic"})


@torch.no_grad()
def test_to_our_sae_matches_saelens_forward_with_non_unit_decoder_and_random_biases():
    saelens_sae = new_topk_training_sae(D_IN, N_LATENTS, K, seed=3)
    generator = torch.Generator().manual_seed(4)
    saelens_sae.W_enc.copy_(torch.randn(D_IN, N_LATENTS, generator=generator))
    directions = torch.randn(N_LATENTS, D_IN, generator=generator)
    norms = torch.rand(N_LATENTS, 1, generator=generator) * 3 + 0.1
    saelens_sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True) * norms)
    saelens_sae.b_enc.copy_(torch.randn(N_LATENTS, generator=generator))
    saelens_sae.b_dec.copy_(torch.randn(D_IN, generator=generator))
    x = torch.randn(256, D_IN, generator=generator) * 2

    ours = to_our_sae(saelens_sae)
    values, indices = ours.encode(x)

    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(N_LATENTS))
    torch.testing.assert_close(dense_latents(values, indices, N_LATENTS), saelens_sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.decode(values, indices), saelens_sae(x), atol=1e-5, rtol=1e-5)


def test_to_our_sae_refuses_a_topk_sae_without_decoder_norm_rescaling():
    saelens_sae = new_topk_training_sae(D_IN, N_LATENTS, K)
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
    init_fvu = to_our_sae(new_topk_training_sae(D_IN, N_LATENTS, K)).forward(x).fvu
    trained_fvu = SparseAutoencoder.load(folders[STEPS]).forward(x).fvu
    assert trained_fvu < init_fvu
