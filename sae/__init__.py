"""TopK sparse autoencoders (Gao et al. 2024) trained on streamed language-model activations.

    from sae import SaeConfig, SparseAutoencoder
    sae = SparseAutoencoder.load("runs/default/transformer.h.2")
    values, indices = sae.encode(x)
"""

from .config import DataConfig, SaeConfig, TrainConfig
from .model import ForwardOutput, SparseAutoencoder

__all__ = ["DataConfig", "ForwardOutput", "SaeConfig", "SparseAutoencoder", "TrainConfig"]
