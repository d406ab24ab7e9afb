"""eval/peers/dead.py: the long-window dead count reads exactly the first N rows of the cache."""

import pytest
import torch

from eval.peers import dead
from sae.cache import ActivationCache, build_cache
from sae.config import DataConfig, SaeConfig, TrainConfig
from sae.model import SparseAutoencoder


@pytest.fixture
def cache(tiny_lm_dir, text_file, tmp_path) -> ActivationCache:
    cfg = TrainConfig(model=str(tiny_lm_dir), hookpoint="transformer.h.1", batch_size=64, max_tokens=15 * 40,
                      data=DataConfig(dataset=str(text_file), ctx_len=16), device="cpu")
    build_cache(cfg, tmp_path / "cache", progress=False)
    return ActivationCache(tmp_path / "cache")


def reference_counts(sae: SparseAutoencoder, rows: torch.Tensor) -> torch.Tensor:
    """Per latent, the rows (N, d_in) among whose top k it is with a positive value, in float64."""
    double = SparseAutoencoder(sae.cfg, dtype=torch.float64)
    double.load_state_dict({name: tensor.double() for name, tensor in sae.state_dict().items()})
    pre = torch.relu((rows.double() - double.b_dec) @ double.encoder.weight.T + double.encoder.bias)
    values, indices = pre.topk(sae.cfg.k, dim=1)
    return torch.bincount(indices[values > 0], minlength=sae.cfg.n_latents)


@pytest.mark.parametrize("window_tokens", [1, 37, 15 * 17, 10**9])
def test_fire_counts_cover_exactly_the_first_rows(cache, monkeypatch, window_tokens):
    monkeypatch.setattr(dead, "ROWS_PER_READ", 40)  # several reads of 2 windows (15 rows each), the last cut short
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=cache.d_in, n_latents=50, k=3))
    sae.encoder.bias.data.normal_()  # some values below zero, so a selected latent need not fire
    every_row = cache.read_windows(0, cache.n_windows, "transformer.h.1")
    counts, rows = dead.window_fire_counts(sae, cache, "transformer.h.1", window_tokens)
    assert rows == min(window_tokens, every_row.shape[0])
    assert torch.equal(counts, reference_counts(sae, every_row[:rows]))


class PlantedCache:
    """A cache's reading interface over given rows: `windows` windows of `per_window` rows each."""

    def __init__(self, rows: torch.Tensor, per_window: int):
        self.rows, self.tokens_per_window = rows, per_window
        self.n_windows = rows.shape[0] // per_window

    def read_windows(self, first_window: int, count: int, hookpoint: str) -> torch.Tensor:
        return self.rows[first_window * self.tokens_per_window : (first_window + count) * self.tokens_per_window]


def test_a_latent_that_fires_once_is_dead_only_in_a_window_that_ends_before_it(tmp_path, monkeypatch):
    """Latent 0 fires on row 23 alone (the one row with a positive first coordinate); the others never
    (zero weights and bias)."""
    monkeypatch.setattr(dead, "ROWS_PER_READ", 10)
    rows = -torch.rand(50, 6)
    rows[23, 0] = 1.0
    sae = SparseAutoencoder(SaeConfig(d_in=6, n_latents=4, k=1))
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.bias.zero_()
        sae.encoder.weight[0, 0] = 1.0
    folder = sae.save(tmp_path / "sae")
    cache = PlantedCache(rows, per_window=5)
    assert dead.window_dead_fraction(folder, cache, "h", 23) == (1.0, 23)
    assert dead.window_dead_fraction(folder, cache, "h", 24) == (0.75, 24)
    assert dead.window_dead_fraction(folder, cache, "h", 1000) == (0.75, 50)


def test_a_transcoder_is_counted_on_its_modules_input(tmp_path):
    """The transcoder's latent 0 fires on row 3 of the module's input (site "h:input") and on no row of
    its output (site "h"): counted on the input, it is alive."""
    rows = {"h:input": -torch.rand(20, 6), "h": -torch.rand(20, 6)}
    rows["h:input"][3, 0] = 1.0

    class TwoSiteCache(PlantedCache):
        def read_windows(self, first_window: int, count: int, hookpoint: str) -> torch.Tensor:
            self.rows = rows[hookpoint]
            return super().read_windows(first_window, count, hookpoint)

    sae = SparseAutoencoder(SaeConfig(d_in=6, n_latents=4, k=1, transcode=True))
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.bias.zero_()
        sae.encoder.weight[0, 0] = 1.0
    folder = sae.save(tmp_path / "transcoder")
    assert dead.window_dead_fraction(folder, TwoSiteCache(rows["h"], per_window=5), "h", 20) == (0.75, 20)
