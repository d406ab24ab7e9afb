"""Held-out text that is what its label says: an explicit --dataset on a folder that does not say what it
was trained on, and one table footer per evaluation text."""

import pytest

from eval.__main__ import main
from eval.report import comparison_table

from known_saes import random_sae


def sparsify_like_sae(tmp_path, tiny_lm_dir):
    """A folder whose cfg.json names no dataset (as sparsify writes them): what training read is unknown."""
    metadata = {"model": str(tiny_lm_dir), "hookpoint": "transformer.h.1", "ctx_len": 16}
    return random_sae(32).save(tmp_path / "sae", metadata=metadata)


def test_explicit_dataset_without_held_out_split_is_refused_when_training_text_is_unknown(tiny_lm_dir, text_file, tmp_path):
    sae_dir = sparsify_like_sae(tmp_path, tiny_lm_dir)
    with pytest.raises(ValueError, match="does not say which text.*no validation or test split.*--split"):
        main([str(sae_dir), "--dataset", str(text_file), "--tokens", "160"])


def test_naming_the_split_evaluates_and_says_so(tiny_lm_dir, text_file, tmp_path):
    sae_dir = sparsify_like_sae(tmp_path, tiny_lm_dir)
    [report] = main([str(sae_dir), "--dataset", str(text_file), "--split", "train", "--tokens", "160"])
    assert report["data"]["held_out"] == "split 'train' (as asked)" and report["tokens"] == 10 * 15


def test_a_table_gets_one_footer_per_evaluation_text():
    numbers = dict(l0=4.0, fvu=0.5, nmse=0.4, ce_sae=4.0, delta_ce=0.1, kl=0.1, ce_recovered=0.9,
                   ce_recovered_mean=0.8, dead_frac=0.0, ce_clean=3.9, ce_zero=9.0, ce_mean=6.0, ce_positions=100)
    reports = [
        {"sae": "a", "model": "m", "hookpoint": "h", "data": {"dataset": "x", "held_out": "split 'validation'"}, **numbers},
        {"sae": "b", "model": "m", "hookpoint": "h", "data": {"dataset": "y", "held_out": "split 'train' (as asked)"}, **numbers},
        {"sae": "c", "model": "m", "hookpoint": "h", "data": {"dataset": "x", "held_out": "split 'validation'"}, **numbers},
    ]
    footers = [line for line in comparison_table(reports).splitlines() if "ce_clean=" in line]
    assert len(footers) == 2 and "(x, split 'validation')" in footers[0] and "(y, split 'train' (as asked))" in footers[1]
