"""SAEs with known behaviour for the eval tests (imported by the test modules of this folder)."""

import torch

from sae import SaeConfig, SparseAutoencoder


def identity_sae(d: int) -> SparseAutoencoder:
    """A real TopK SAE with decode(encode(x)) == x exactly: latents are +e_i and -e_i, k = d.

    For every coordinate exactly one of x_i, -x_i is >= 0, so the top d of [x; -x] keep them all and
    decoding adds each back along +-e_i (one non-zero term per output coordinate: no rounding)."""
    sae = SparseAutoencoder(SaeConfig(d_in=d, n_latents=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.b_dec.zero_()
    return sae


def constant_sae(d: int, value: torch.Tensor) -> SparseAutoencoder:
    """An SAE whose reconstruction is `value` (d,) whatever the input: W_dec = 0, b_dec = value."""
    sae = SparseAutoencoder(SaeConfig(d_in=d, n_latents=8, k=2))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(value)
    return sae


def random_sae(d: int, n_latents: int = 64, k: int = 4, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d, n_latents=n_latents, k=k))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
    return sae
