"""Feature absorption (eval/absorption.py): the first-letter labels, SAEBench's absorption fraction and full
absorption on hand-computed rows, the feature-splitting rule, a hand-built SAE whose letter latent is
absorbed by token-specific latents on a known subset (and the same SAE with nothing absorbed), skipped
letters, the probe-quality flag, token hygiene, and the option end to end (report section, table column,
--help, --replace_all, transcoders, the browser's section)."""

import json
import math

import pytest
import torch

from eval import absorption
from eval.__main__ import EvalConfig, main
from eval.absorption import (AlongProbe, Positions, absorption_fractions, absorption_scores, check_absorption_sae,
                             first_letter, full_absorbers, main_latents)
from eval.browse.metrics import absorption_html
from eval.probe import fit_half
from eval.report import interpretability_table
from sae.config import SaeConfig
from sae.errors import UsageError
from sae.model import SparseAutoencoder

BLOCK = 10
"""Positions per half-block of the synthetic positions: 0-9 train, 10-19 test, ..."""


def test_first_letter_strips_whitespace_and_word_markers_and_keeps_only_alphabetic_tokens():
    assert [first_letter(token) for token in (" The", "apple", "Ġbanana", "▁Zoo", "\tx")] == ["t", "a", "b", "z", "x"]
    assert [first_letter(token) for token in ("3", " don't", "", " ", "\n", "é", " a1", "_x")] == [None] * 8


# ---- the per-position definitions, by hand ---------------------------------------------------------------

def test_absorption_fraction_and_full_absorption_on_hand_computed_rows():
    """Latent 0 is the main latent; 1-4 are aligned with p (cosine 0.5), 5 barely (0.05: a full absorber,
    not an absorber of the fraction), 6 not at all. Each row's a = 2 unless said."""
    cosines = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5, 0.05, 0.0], dtype=torch.float64)
    rows = [  # (a, [(latent, value, contribution along p)] * 4)
        (2.0, [(0, 0.0, 0.0), (1, 3.0, 1.5), (6, 1.0, 0.0), (2, 0.0, 0.0)]),    # main silent, 1 carries 0.75 a
        (2.0, [(0, 1.1, 1.0), (1, 1.8, 0.9), (6, 1.0, 0.0), (2, 0.0, 0.0)]),    # partial: 0.9 / (0.9 + 1.0)
        (2.0, [(0, 2.8, 2.5), (1, 1.0, 0.5), (6, 1.0, 0.0), (2, 0.0, 0.0)]),    # main carries more than a
        (2.0, [(6, 1.0, 0.0), (1, 1.4, 0.7), (3, 0.0, 0.0), (2, 0.0, 0.0)]),    # 0.7 < 0.4 a: too little
        (2.0, [(5, 30.0, 1.5), (6, 1.0, 0.0), (3, 0.0, 0.0), (2, 0.0, 0.0)]),   # cosine 0.05: full only
        (-1.0, [(6, 1.0, 0.0), (1, 1.0, 0.5), (3, 0.0, 0.0), (2, 0.0, 0.0)]),   # the probe does not see it
        (2.0, [(1, 0.5, 0.25), (2, 0.5, 0.25), (3, 0.5, 0.25), (4, 0.5, 0.25)]),  # the 4th absorber does not count
    ]
    along = AlongProbe(target=torch.tensor([a for a, _ in rows], dtype=torch.float64),
                       contributions=torch.tensor([[c for _, _, c in entries] for _, entries in rows], dtype=torch.float64),
                       values=torch.tensor([[v for _, v, _ in entries] for _, entries in rows]),
                       indices=torch.tensor([[j for j, _, _ in entries] for _, entries in rows]))
    is_main = along.indices == 0
    fractions = absorption_fractions(along, is_main, cosines)
    torch.testing.assert_close(fractions, torch.tensor([1.0, 0.9 / 1.9, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert full_absorbers(along, is_main, cosines).tolist() == [1, -1, -1, -1, 5, -1, -1]


def test_feature_splitting_keeps_a_second_latent_that_raises_f1_by_more_than_the_jump():
    """Latents 3 and 8 each fire on half of the positives: k = 1 reaches F1 2/3, k = 2 reaches 1, k = 3
    adds nothing, so both are main latents (Chanin et al.'s tau_fs rule); the F1 of each k tried is listed."""
    n = 400
    labels = (torch.arange(n) % 4 == 0).double()
    values = torch.zeros(n, 2)
    indices = torch.stack([torch.full((n,), 20), torch.full((n,), 21)], 1)  # other latents, value 0
    first = (labels == 1) & (torch.arange(n) % 8 == 0)
    second = (labels == 1) & ~first
    values[first, 0], indices[first, 0] = 1.0, 3
    values[second, 0], indices[second, 0] = 0.9, 8
    main, f1s = main_latents(values, indices, labels, n_latents=32)
    assert main == [3, 8]
    assert f1s[0] == pytest.approx(2 / 3) and f1s[1] == 1.0 and len(f1s) == 3


# ---- a hand-built SAE with planted absorption --------------------------------------------------------------

D = 8
ABSORBED = {101: 1, 102: 2, 103: 3}
"""Token id -> the coordinate (and latent) of the three 'a' tokens whose letter latent is absorbed."""


def planted_sae() -> SparseAutoencoder:
    """Latent 0 reads and writes e0, "starts with a", but its encoder is switched off by e1-e3: the tokens
    101-103, whose token-specific latents 1-3 (encoder e_i, decoder (e0 + e_i) / sqrt 2, so half their
    norm squared along latent 0's direction) fire in its place. Latents 4 and 5 are the letters b and c
    (e4, e5); 6 and 7 read e6 and e7, noise only. k = 2."""
    sae = SparseAutoencoder(SaeConfig(d_in=D, n_latents=8, k=2))
    eye = torch.eye(D)
    encoder, decoder = eye.clone(), eye.clone()
    encoder[0] = eye[0] - 2 * (eye[1] + eye[2] + eye[3])
    for i in (1, 2, 3):
        decoder[i] = (eye[0] + eye[i]) / math.sqrt(2)
    with torch.no_grad():
        sae.encoder.weight.copy_(encoder)
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(decoder)
        sae.b_dec.zero_()
    return sae


def planted_tokens(n: int = 3000, seed: int = 0) -> tuple[list[int], list[str | None]]:
    """Token ids and their first letters: 'a' (40% of the positions: ids 1 and 101-103, the absorbed ones 3%
    of the 'a' tokens each, few enough that none is taken for a split of the letter's feature: each adds
    under 0.03 to the k-sparse F1), 'b', 'c', 'e' (fewer than 'c', and looking like it), five 'z', digits."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(n, generator=generator)
    ids = []
    for u in draw.tolist():
        ids.append(101 if u < 0.012 else 102 if u < 0.024 else 103 if u < 0.036 else 1 if u < 0.4 else
                   2 if u < 0.55 else 3 if u < 0.75 else 5 if u < 0.83 else 9)
    for position in (7, 517, 1234, 2001, 2900):
        ids[position] = 26
    letter_of = {1: "a", 101: "a", 102: "a", 103: "a", 2: "b", 3: "c", 5: "e", 26: "z", 9: None}
    return ids, [letter_of[token] for token in ids]


def planted_hidden(ids: list[int], absorbed: bool, seed: int = 1) -> torch.Tensor:
    """(N, D) activations: 2 e0 on 'a' tokens (+ 2 e_i on the absorbed ones when `absorbed`), 2 e4 on
    'b', 2 e5 on 'c' and 'e' alike, 2 e6 on 'z', 2 e7 on digits; plus noise of std 0.05."""
    coordinate = {1: [0], 101: [0, 1], 102: [0, 2], 103: [0, 3], 2: [4], 3: [5], 5: [5], 26: [6], 9: [7]}
    hidden = 0.05 * torch.randn(len(ids), D, generator=torch.Generator().manual_seed(seed))
    for position, token in enumerate(ids):
        for axis in coordinate[token] if absorbed else coordinate[token][:1]:
            hidden[position, axis] += 2.0
    return hidden


def planted_positions(absorbed: bool = True, keep: torch.Tensor | None = None) -> Positions:
    ids, letters = planted_tokens()
    hidden = planted_hidden(ids, absorbed)
    values, indices = planted_sae().encode(hidden)
    n = len(ids)
    return Positions(hidden, values.detach(), indices, letters, fit_half(n, BLOCK),
                     torch.ones(n, dtype=torch.bool) if keep is None else keep)


def test_planted_absorption_equals_the_share_of_absorbed_tokens_among_the_probes_true_positives():
    ids, _ = planted_tokens()
    section = absorption_scores(planted_positions(), planted_sae())
    entry = section["letters"]["a"]
    test_a = [token for position, token in enumerate(ids) if (position // BLOCK) % 2 == 1 and token in (1, *ABSORBED)]
    share = sum(token in ABSORBED for token in test_a) / len(test_a)
    assert entry["probe"]["f1"] == entry["probe"]["auc"] == 1.0 and entry["usable"] and entry["probe_true_positives"] == len(test_a)
    assert entry["main_latents"] == [0] and entry["main_latent_cos"][0] > 0.5
    assert entry["mean_absorption_fraction"] == pytest.approx(share, abs=1e-12)
    assert entry["full_absorption_rate"] == pytest.approx(share, abs=1e-12)  # as constructed: latent 0 silent there
    assert entry["main_silent_rate"] == pytest.approx(share, abs=1e-12)
    assert entry["full_absorptions"] == sum(token in ABSORBED for token in test_a)
    assert sorted(latent for latent, _ in entry["top_absorbers"]) == [1, 2, 3]
    for letter in ("b", "c"):  # their latents fire on every token of theirs: nothing absorbed
        assert section["letters"][letter]["mean_absorption_fraction"] == 0.0
        assert section["letters"][letter]["full_absorption_rate"] == 0.0
    assert 0.05 < share < 0.15 and section["letters_averaged"] == 3
    assert section["mean_absorption_fraction"] == pytest.approx(share / 3, abs=1e-12)
    assert section["probe_true_positives"] == sum(section["letters"][letter]["probe_true_positives"] for letter in "abc")


def test_without_absorption_every_rate_is_zero():
    section = absorption_scores(planted_positions(absorbed=False), planted_sae())
    assert section["mean_absorption_fraction"] == 0.0 and section["full_absorption_rate"] == 0.0
    assert section["letters"]["a"]["main_latents"] == [0] and section["letters"]["a"]["main_silent_rate"] == 0.0


def test_a_rare_letter_is_skipped_with_its_counts_and_a_bad_probe_is_flagged():
    """'z' has 5 tokens; 'e' tokens look exactly like the commoner 'c' ones, so its probe never says 'e'
    (F1 0): reported, flagged unusable, left out of the means."""
    section = absorption_scores(planted_positions(), planted_sae())
    assert set(section["skipped"]) == set("dfghijklmnopqrstuvwxyz")
    assert section["skipped"]["z"].startswith("5 positive and ") and "needs at least 32" in section["skipped"]["z"]
    assert section["skipped"]["d"].startswith("0 positive and ")
    quality = section["probe_quality"]
    assert section["letters"]["e"]["probe"]["f1"] < absorption.MIN_PROBE_F1 and not section["letters"]["e"]["usable"]
    assert quality["usable_letters"] == ["a", "b", "c"] and quality["unusable_letters"] == ["e"]
    assert quality["verdict"] == "partial" and quality["min_f1"] == absorption.MIN_PROBE_F1
    assert quality["mean_f1"] == pytest.approx(sum(section["letters"][x]["probe"]["f1"] for x in "abce") / 4)


def test_excluded_positions_take_no_part():
    """Leaving out every absorbed token's positions (as token hygiene would) leaves no absorption."""
    ids, _ = planted_tokens()
    keep = torch.tensor([token not in ABSORBED for token in ids])
    section = absorption_scores(planted_positions(keep=keep), planted_sae())
    assert section["letters"]["a"]["mean_absorption_fraction"] == 0.0
    assert section["letters"]["a"]["positives"] == sum(token == 1 for token in ids)


def test_a_transcoder_is_refused_in_one_line():
    transcoder = SparseAutoencoder(SaeConfig(d_in=4, n_latents=8, k=2, transcode=True))
    with pytest.raises(UsageError, match="runs/t is a transcoder"):
        check_absorption_sae(transcoder, "runs/t")


# ---- end to end: the option, the report, the table, the browser ----------------------------------------

def test_option_adds_the_section_and_the_table_column(embedded_sae_dir, tmp_path, capsys):
    data_dir = str(embedded_sae_dir.parent.parent.parent / "data")  # the embedded fixture builds its corpus there
    out = tmp_path / "report.json"
    [report] = main([str(embedded_sae_dir), "--absorption", "--tokens", "4096", "--data_dir", data_dir,
                     "--out", str(out)])
    section = report["absorption"]
    assert json.loads(out.read_text())["absorption"] == json.loads(json.dumps(section))
    assert section["excluded_token_ids"]  # the SAE was trained without its separators
    assert set(section["letters"]) | set(section["skipped"]) == set(absorption.LETTERS) and section["letters"]
    for entry in section["letters"].values():
        assert 0 <= entry["probe"]["f1"] <= 1 and entry["main_latents"]
        assert entry["probe_true_positives"] <= entry["test_positives"] <= entry["positives"] <= report["tokens"]
        if entry["probe_true_positives"]:
            assert 0 <= entry["mean_absorption_fraction"] <= 1 and 0 <= entry["full_absorption_rate"] <= 1
    quality = section["probe_quality"]
    assert quality["verdict"] in ("good", "partial", "poor")
    assert set(quality["usable_letters"]) | set(quality["unusable_letters"]) == set(section["letters"])
    printed = capsys.readouterr().out
    assert "absorption (full)" in printed
    assert f"{section['letters_averaged']}/{len(section['letters'])} letters" in printed


def test_help_lists_the_option_and_replace_all_refuses_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["x", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--absorption " in printed and "Feature absorption" in printed
    with pytest.raises(ValueError, match="--absorption run without it"):
        EvalConfig(absorption=True, replace_all=True)


def test_table_cell_and_browser_section_from_a_report():
    entry = {"positives": 300, "test_positives": 150, "test_negatives": 4000,
             "probe": {"accuracy": 0.98, "precision": 0.8, "recall": 0.7, "f1": 0.7467, "majority_accuracy": 0.96},
             "usable": True, "main_latents": [12, 40], "main_latent_cos": [0.3, 0.2], "split_f1": [0.5, 0.6, 0.61],
             "probe_true_positives": 105, "main_silent_rate": 0.3, "mean_absorption_fraction": 0.125,
             "full_absorptions": 7, "full_absorption_rate": 0.0667, "top_absorbers": [[77, 5], [3, 2]]}
    section = {"mean_absorption_fraction": 0.125, "full_absorption_rate": 0.0667, "letters_averaged": 1,
               "probe_true_positives": 105, "letters": {"t": entry}, "skipped": {"z": "8 positive"},
               "probe_quality": {"min_f1": 0.6, "mean_f1": 0.5, "mean_accuracy": 0.97, "usable_letters": ["t"],
                                 "unusable_letters": ["s"], "verdict": "partial"}}
    header, row = interpretability_table([{"sae": "runs/a", "absorption": section}]).splitlines()
    assert "absorption (full)" in header and row.endswith("0.125 (0.067) · 1/2 letters, 105 tokens")
    html = absorption_html({"absorption": section})
    assert 'id="absorption-table"' in html and "z: 8 positive" in html and "77 ×5" in html
    assert 'data-value="0.125"' in html and "12, 40" in html and "partial" in html
    assert absorption_html({"sae": "runs/a"}) == ""


def test_batchtopk_codes_of_different_widths_are_padded_with_silent_entries(tiny_lm, windows):
    """A BatchTopK SAE's codes are as wide as each batch's busiest token; batches of 3 windows get different
    widths, and the padded codes decode to what each batch's own codes decode to."""
    model, _ = tiny_lm
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4, activation="batchtopk"))
    with torch.no_grad():
        sae.threshold.fill_(0.05)  # batches of widths 16, 32, 16, 16 (this seed)
    hidden, values, indices = absorption.encode_positions(model, "transformer.h.1", sae, windows, batch_windows=3)
    widths = {absorption.encode_windows(model, "transformer.h.1", sae, windows[first : first + 3]).values.shape[1]
              for first in range(0, len(windows), 3)}
    assert len(widths) > 1 and values.shape == (len(windows) * 15, max(widths)) == indices.shape
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(values, indices), sae.reconstruct(hidden)[0], rtol=0, atol=1e-5)
