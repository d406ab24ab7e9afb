"""nmse, fvu, mse, L0, the never-fired fraction and the density histogram against float64 references."""

import torch

from eval.reconstruction import DENSITY_BIN_EDGES, ReconstructionStats

from known_saes import random_sae


def test_summary_matches_float64_reference_on_fixed_activations():
    torch.manual_seed(1)
    d = 24
    sae = random_sae(d, n_latents=300, k=5)
    batches = [torch.randn(n, d) * 3 + 2 for n in (50, 7, 33)]  # a large mean, like a residual stream
    x = torch.cat(batches).double()
    stats = ReconstructionStats(300, mean=x.mean(0))
    codes = []
    for batch in batches:
        values, indices = sae.encode(batch)
        values[::3, 0] = 0  # some selected latents with value 0: not counted in L0 or as firing
        stats.update(batch, sae.decode(values, indices), values, indices)
        codes.append((values.double(), indices))
    values = torch.cat([c[0] for c in codes])
    indices = torch.cat([c[1] for c in codes])
    dense = torch.zeros(len(x), 300, dtype=torch.float64).scatter_add_(1, indices, values)
    x_hat = dense @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    error = (x - x_hat).pow(2).sum()
    summary = stats.summary()
    assert abs(summary["nmse"] - (error / x.pow(2).sum()).item()) < 1e-6
    assert abs(summary["fvu"] - (error / (x - x.mean(0)).pow(2).sum()).item()) < 1e-6
    assert abs(summary["mse"] - (error / x.numel()).item()) < 1e-6
    assert summary["fvu"] > summary["nmse"]  # the mean carries much of the energy
    assert summary["l0"] == (values > 0).sum().item() / len(x)
    fired = torch.zeros(300, dtype=torch.bool)
    fired[indices[values > 0]] = True
    # latents silent on all of these tokens, with the count of tokens it holds for; not training's dead_frac
    assert summary["never_fired_frac"] == 1 - fired.double().mean().item() and summary["never_fired_tokens"] == len(x)
    assert "dead_frac" not in summary
    density = (dense > 0).double().mean(0)  # per latent, the fraction of tokens it fires on
    assert summary["dense_frac"] == (density > 0.1).double().mean().item()
    assert 0 < summary["dense_frac"] < 1  # the check sees both kinds of latent here
    histogram = summary["density_histogram"]
    assert histogram["never_fired"] == (~fired).sum().item()
    assert sum(histogram["counts"]) == fired.sum().item()


def test_density_histogram_bins():
    stats = ReconstructionStats(4, mean=torch.zeros(2))
    # 1000 tokens; latent 0 fires on all (density 1), 1 on 100 (1e-1), 2 on 3 (3e-3), 3 never
    indices = torch.tensor([[0, 1]] * 100 + [[0, 2]] * 3 + [[0, 0]] * 897)
    values = torch.ones(1000, 2)
    values[103:, 1] = 0
    stats.update(torch.zeros(1000, 2), torch.zeros(1000, 2), values, indices)
    histogram = stats.summary()["density_histogram"]
    edges = histogram["log10_bin_edges"]
    assert edges == DENSITY_BIN_EDGES and len(histogram["counts"]) == len(edges) - 1
    expected = [0] * (len(edges) - 1)
    expected[-1] += 1  # density 1 -> the last bin [-0.5, 0]
    expected[edges.index(-1.0)] += 1  # 1e-1 -> [-1, -0.5)
    expected[edges.index(-3.0)] += 1  # 3e-3 (log10 -2.52) -> [-3, -2.5)
    assert histogram["counts"] == expected and histogram["never_fired"] == 1
