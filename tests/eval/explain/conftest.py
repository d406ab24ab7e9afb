"""Fixtures for the explain tests: small causal LMs whose tokenizers have "10" as one token or as two, and
records of random units over windows whose tokens name them."""

import pytest
import torch

from eval.explain.records import collect_records


def _digit_lm(save_tiny_gpt2, path, merge_ten: bool):
    lines = [f"word{i % 7}\t{i % 10}\n" for i in range(400)]
    if merge_ten:
        lines += ["x\t10\n"] * 400  # frequent enough that BPE merges "1" "0" into one token
    save_tiny_gpt2(path, lines, vocab_size=280, n_positions=2048, n_layer=2, seed=1)
    from transformers import AutoTokenizer

    assert (len(AutoTokenizer.from_pretrained(path).encode("10")) == 1) == merge_ten
    return path


@pytest.fixture(scope="session")
def lm_ten_one_token(tmp_path_factory, tiny_gpt2_factory):
    return _digit_lm(tiny_gpt2_factory, tmp_path_factory.mktemp("lm") / "ten-one", merge_ten=True)


@pytest.fixture(scope="session")
def lm_ten_two_tokens(tmp_path_factory, tiny_gpt2_factory):
    return _digit_lm(tiny_gpt2_factory, tmp_path_factory.mktemp("lm") / "ten-two", merge_ten=False)


@pytest.fixture
def window_named_records():
    """build(n_windows, n_units, fire_probability, **collect_records options) -> (records, table): units that
    fire (a uniform activation at each of 8 positions) in a random `fire_probability` of the windows, each
    window's 9 tokens its own number, so an excerpt names the window it came from; table[window, position,
    unit] holds the activations. Seeded: the same arguments give the same records."""
    def build(n_windows: int, n_units: int, fire_probability: float, **options):
        generator = torch.Generator().manual_seed(1)
        windows = torch.arange(n_windows)[:, None].expand(-1, 9)
        fires = torch.rand(n_windows, 1, n_units, generator=generator) < fire_probability
        table = torch.rand(n_windows, 8, n_units, generator=generator) * fires
        records = collect_records(windows, lambda ids: table[ids[:, 0]], list(range(n_units)),
                                  lambda ids: [str(i) for i in ids.tolist()], "latent", batch_windows=7, seed=3, **options)
        return records, table
    return build
