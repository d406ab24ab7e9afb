"""`eval.scaling`: the fits recover known coefficients (exactly without noise, inside their 95% intervals
with it), end at a stationary point of the cost, their standard errors match a finite-difference float64
reference, too few points are refused, and `python -m eval.scaling` on a folder of small SAE folders
writes scaling.json and a parseable SVG."""

import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.scaling import JOINT, _covariance, find_sae_folders, fit_joint, fit_width, main, predict, scaling_svg
from sae import SaeConfig, SparseAutoencoder
from sae.errors import UsageError

from known_saes import random_sae

JOINT_TRUTH = {"alpha": -0.5, "beta_k": -0.25, "beta_n": -0.3, "gamma": -0.02, "zeta": -4.0, "eta": -0.3}
WIDTH_TRUTH = {"a": 1.0, "b": -0.3, "c": 0.02}
WIDTHS = [512, 1024, 2048, 4096, 8192]
KS = [8, 16, 32, 64]


def joint_law(n: float, k: float, t: dict) -> float:
    """Gao et al. eq. 4, written out independently of eval.scaling."""
    log_n, log_k = math.log(n), math.log(k)
    return (math.exp(t["alpha"] + t["beta_k"] * log_k + t["beta_n"] * log_n + t["gamma"] * log_k * log_n)
            + math.exp(t["zeta"] + t["eta"] * log_k))


def width_law(n: float, t: dict) -> float:
    return math.exp(t["a"]) * n ** t["b"] + t["c"]


def noisy(losses: list[float], sigma: float, seed: int) -> list[float]:
    """Each loss times exp(sigma * standard normal), seeded."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(len(losses), generator=generator, dtype=torch.float64)
    return [loss * math.exp(sigma * float(draw)) for loss, draw in zip(losses, draws)]


def grid() -> tuple[list[int], list[int]]:
    return [n for n in WIDTHS for _ in KS], [k for _ in WIDTHS for k in KS]


def test_width_fit_recovers_exact_coefficients():
    losses = [width_law(n, WIDTH_TRUTH) for n in WIDTHS]
    fit = fit_width(WIDTHS, losses)
    assert fit["converged"] and fit["law"] == "width" and fit["n_points"] == 5
    for name, value in WIDTH_TRUTH.items():
        assert fit["coefficients"][name] == pytest.approx(value, abs=1e-7)
    assert fit["rms_log_residual"] < 1e-9
    assert fit["fitted"] == pytest.approx(losses, rel=1e-9)


def test_joint_fit_recovers_exact_coefficients():
    widths, ks = grid()
    losses = [joint_law(n, k, JOINT_TRUTH) for n, k in zip(widths, ks)]
    fit = fit_joint(widths, ks, losses)
    assert fit["converged"] and fit["n_points"] == 20 and list(fit["coefficients"]) == list(JOINT_TRUTH)
    for name, value in JOINT_TRUTH.items():
        assert fit["coefficients"][name] == pytest.approx(value, abs=1e-6)
    assert fit["rms_log_residual"] < 1e-9
    assert predict(fit, [1000.0, 3000.0], 24) == pytest.approx([joint_law(1000, 24, JOINT_TRUTH),
                                                                joint_law(3000, 24, JOINT_TRUTH)], rel=1e-8)


def test_noisy_width_fits_cover_the_truth_about_95_percent_of_the_time():
    """30 seeded sweeps with 2% noise: too-small standard errors would cover far less, too-large ones all."""
    widths = [512, 1024, 2048, 4096, 8192, 16384]
    inside = []
    for seed in range(30):
        fit = fit_width(widths, noisy([width_law(n, WIDTH_TRUTH) for n in widths], 0.02, seed))
        inside += [fit["ci95"][name][0] <= value <= fit["ci95"][name][1] for name, value in WIDTH_TRUTH.items()]
        assert fit["degrees_of_freedom"] == 3 and 0.002 < fit["rms_log_residual"] < 0.04
    assert 0.85 <= sum(inside) / len(inside) < 0.99


def test_noisy_joint_fits_hold_the_truth_inside_their_intervals():
    """20 seeded sweeps with 0.2% noise, small enough for the linearised intervals to hold (at 1% they
    cover about 80%: docs/metrics.md, "Scaling fits"). Too small standard errors would miss often; their exact
    value is checked against a finite-difference reference below."""
    widths, ks = grid()
    inside = []
    for seed in range(20):
        fit = fit_joint(widths, ks, noisy([joint_law(n, k, JOINT_TRUTH) for n, k in zip(widths, ks)], 0.002, seed))
        assert fit["degrees_of_freedom"] == 14 and 0.0005 < fit["rms_log_residual"] < 0.004
        inside += [fit["ci95"][name][0] <= value <= fit["ci95"][name][1] for name, value in JOINT_TRUTH.items()]
    assert sum(inside) / len(inside) >= 0.9


def test_standard_errors_match_a_finite_difference_reference():
    """s^2 (J^T J)^-1 with J by central differences of log L in float64, at the reported coefficients."""
    widths, ks = grid()
    losses = noisy([joint_law(n, k, JOINT_TRUTH) for n, k in zip(widths, ks)], 0.02, seed=5)
    fit = fit_joint(widths, ks, losses)
    names, theta = list(fit["coefficients"]), list(fit["coefficients"].values())

    def log_residuals(values):
        coefficients = dict(zip(names, values))
        return torch.tensor([math.log(joint_law(n, k, coefficients)) - math.log(loss)
                             for n, k, loss in zip(widths, ks, losses)], dtype=torch.float64)

    step = 1e-6
    columns = []
    for index in range(len(theta)):
        up, down = list(theta), list(theta)
        up[index] += step
        down[index] -= step
        columns.append((log_residuals(up) - log_residuals(down)) / (2 * step))
    jacobian = torch.stack(columns, dim=1)
    residuals = log_residuals(theta)
    variance = float(residuals @ residuals) / (len(losses) - len(theta))
    reference = (variance * torch.linalg.inv(jacobian.T @ jacobian)).diagonal().sqrt()
    assert list(fit["standard_errors"].values()) == pytest.approx(reference.tolist(), rel=1e-4)
    assert fit["rms_log_residual"] == pytest.approx(math.sqrt(float(residuals @ residuals) / len(losses)), rel=1e-9)
    for name, error in zip(names, reference.tolist()):
        low, high = fit["ci95"][name]
        assert (high - low) / 2 == pytest.approx(2.144787 * error, rel=1e-4)  # t quantile, 14 degrees of freedom


def test_the_joint_jacobian_matches_central_differences():
    """`JOINT.jacobian` (exact, used by the solver and the covariance) against central differences of
    the independently written law, in float64."""
    widths, ks = grid()
    theta = list(JOINT_TRUTH.values())
    jacobian = JOINT.jacobian(np.array(theta), np.log(widths), np.log(ks))
    step = 1e-6
    for index, name in enumerate(JOINT_TRUTH):
        up, down = dict(JOINT_TRUTH), dict(JOINT_TRUTH)
        up[name] += step
        down[name] -= step
        column = [(math.log(joint_law(n, k, up)) - math.log(joint_law(n, k, down))) / (2 * step)
                  for n, k in zip(widths, ks)]
        assert jacobian[:, index].tolist() == pytest.approx(column, rel=1e-7, abs=1e-9)


def test_the_joint_fit_ends_where_the_gradient_vanishes():
    """At a least-squares minimum the residuals r are orthogonal to every column J_j of their Jacobian:
    |J_j . r| / (|J_j| |r|) is 0 up to rounding. A solver that stops while the cost still falls by a
    relative 1e-10 per step leaves about 1e-7 here on this sweep (3% noise)."""
    widths, ks = grid()
    losses = noisy([joint_law(n, k, JOINT_TRUTH) for n, k in zip(widths, ks)], 0.03, seed=0)
    fit = fit_joint(widths, ks, losses)
    log_n, log_k = np.log(widths), np.log(ks)
    theta = np.array(list(fit["coefficients"].values()))
    residuals = JOINT.log_loss(theta, log_n, log_k) - np.log(losses)
    jacobian = JOINT.jacobian(theta, log_n, log_k)
    cosines = np.abs(jacobian.T @ residuals) / (np.linalg.norm(jacobian, axis=0) * np.linalg.norm(residuals))
    assert cosines.max() < 2e-8


def test_fits_are_deterministic():
    widths, ks = grid()
    losses = noisy([joint_law(n, k, JOINT_TRUTH) for n, k in zip(widths, ks)], 0.03, seed=3)
    first = fit_joint(widths, ks, losses)
    assert all(fit_joint(widths, ks, losses) == first for _ in range(3))  # bitwise: every float equal


def test_too_few_or_bad_points_are_refused():
    with pytest.raises(UsageError, match="at least 7 distinct .* 6 parameters, got 6"):
        fit_joint([512, 1024, 2048] * 2, [8] * 3 + [16] * 3, [0.2, 0.15, 0.1, 0.18, 0.12, 0.09])
    with pytest.raises(UsageError, match="at least 7 distinct .* got 6"):  # a repeated point adds nothing
        fit_joint([512, 1024, 2048] * 2 + [512], [8] * 3 + [16] * 3 + [8], [0.2, 0.15, 0.1, 0.18, 0.12, 0.09, 0.21])
    with pytest.raises(UsageError, match="at least 2 distinct k, got only 16"):
        fit_joint(WIDTHS + [16384, 32768], [16] * 7, [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.06])
    with pytest.raises(UsageError, match="at least 4 distinct widths for its 3 parameters, got 3"):
        fit_width([512, 1024, 2048, 2048], [0.2, 0.15, 0.1, 0.11])
    with pytest.raises(UsageError, match="loss must be finite and positive .* got 0.0 at point 2"):
        fit_width(WIDTHS, [0.2, 0.15, 0.0, 0.1, 0.08])
    with pytest.raises(UsageError, match="one value per point"):
        fit_width(WIDTHS, [0.2, 0.15])


def test_covariance_by_hand_and_none_when_singular():
    """J = [[1, 0], [0, 2], [0, 0]]: J^T J = diag(1, 4), so s^2 (J^T J)^-1 = s^2 diag(1, 1/4). Two equal
    columns (two parameters the points cannot tell apart): None."""
    jacobian = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert np.allclose(_covariance(jacobian, 0.5), [[0.5, 0.0], [0.0, 0.125]], rtol=1e-15, atol=0)
    assert _covariance(np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), 0.5) is None


# ----------------------------------------------------------------------------------------------
# The CLI


def save_sae(folder: Path, n_latents: int, k: int, hookpoint: str = "transformer.h.2") -> Path:
    cfg = SaeConfig(d_in=4, n_latents=n_latents, k=k)
    return SparseAutoencoder(cfg).save(folder, metadata={"model": "tiny", "hookpoint": hookpoint, "tokens_trained": 4096})


def sweep_with_report(tmp_path: Path) -> tuple[Path, Path, dict]:
    """runs/sweep/n{N}-k{K}/transformer.h.2 for k 8, 16, 32 at four widths and k 64 at three (as the trainer
    lays out variants), a hidden temporary copy that must be skipped, and report.json with their fvu."""
    run = tmp_path / "runs" / "sweep"
    losses, entries = {}, []
    for k in (8, 16, 32, 64):
        for n in (512, 1024, 2048, 4096)[: 3 if k == 64 else 4]:
            folder = save_sae(run / f"n{n}-k{k}" / "transformer.h.2", n, k)
            losses[str(folder)] = joint_law(n, k, JOINT_TRUTH)
    save_sae(run / ".tmp-n512-k8", 512, 8)
    noisy_losses = noisy(list(losses.values()), 0.01, seed=0)
    for folder, loss in zip(losses, noisy_losses):
        entries.append({"sae": folder, "model": "tiny", "hookpoint": "transformer.h.2", "fvu": loss, "l0": 8.0})
    report = tmp_path / "report.json"
    report.write_text(json.dumps(entries))
    return run, report, dict(zip(losses, noisy_losses))


def test_cli_fits_a_sweep_from_a_report(tmp_path, capsys):
    run, report, losses = sweep_with_report(tmp_path)
    scaling = main([str(run), "--report", str(report)])
    written = json.loads((run / "scaling.json").read_text())
    assert written == json.loads(json.dumps(scaling))
    assert {point["sae"]: point["loss"] for point in written["points"]} == losses
    assert all(".tmp" not in point["sae"] for point in written["points"])
    laws = [(fit["law"], fit.get("k")) for fit in written["fits"]]
    assert laws == [("joint", None), ("width", 8), ("width", 16), ("width", 32)]
    joint = written["fits"][0]
    assert joint["n_points"] == 15 and len(joint["fitted"]) == 15 and joint["formula"].startswith("L(n, k) = exp(alpha")
    for name in ("beta_k", "beta_n"):  # the exponents; 15 points pin the irreducible loss (zeta, eta) less well
        assert joint["ci95"][name][0] <= JOINT_TRUTH[name] <= joint["ci95"][name][1]
    assert written["skipped"] == ["width law at k=64 (fit_width needs at least 4 distinct widths for its 3 "
                                  "parameters, got 3)"]
    printed = capsys.readouterr().out
    assert "skipped: width law at k=64" in printed and "beta_n" in printed and "wrote " in printed
    svg = ElementTree.fromstring((run / "scaling.svg").read_text())
    namespace = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{namespace}polyline")) == 4 + 3  # the joint law at each k, three width laws
    assert len(svg.findall(f"{namespace}circle")) == 15 + 4  # the points and the legend's k

    main([str(run), "--report", str(report)])
    assert "replacing this tool's previous output" in capsys.readouterr().out


def test_cli_refuses_what_it_cannot_fit(tmp_path):
    run, report, _ = sweep_with_report(tmp_path)
    with pytest.raises(UsageError, match="has no key 'ce_recovered'; its numeric keys: fvu, l0"):
        main([str(run), "--report", str(report), "--metric", "ce_recovered"])
    extra = save_sae(run / "extra" / "transformer.h.2", 8192, 8)
    with pytest.raises(UsageError, match=re.escape(f"has no report of {extra}")):
        main([str(run), "--report", str(report)])
    save_sae(tmp_path / "other" / "transformer.h.4", 512, 8, hookpoint="transformer.h.4")
    with pytest.raises(UsageError, match="different activations.*hookpoint transformer.h.4"):
        main([str(run), str(tmp_path / "other"), "--report", str(report)])
    lone = save_sae(tmp_path / "lone" / "transformer.h.2", 512, 8)
    (tmp_path / "lone.json").write_text(json.dumps({"sae": str(lone), "fvu": 0.2}))
    with pytest.raises(UsageError, match="nothing to fit among 1 SAEs: joint law .*; width law at k=8"):
        main([str(tmp_path / "lone"), "--report", str(tmp_path / "lone.json")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no SAE folder"):
        main([str(tmp_path / "empty"), "--report", str(report)])
    with pytest.raises(ValueError, match="give one of them"):
        main([str(run), "--report", str(report), "--eval.tokens", "512"])
    assert not (tmp_path / "lone" / "scaling.json").exists()


def test_sae_folders_are_found_at_and_under_the_run_folders(tmp_path):
    a = save_sae(tmp_path / "run" / "a", 64, 4)
    b = save_sae(tmp_path / "run" / "v" / "transformer.h.1", 64, 8)
    (tmp_path / "run" / "half").mkdir()
    (tmp_path / "run" / "half" / "cfg.json").write_text("{}")  # no weights: not an SAE folder
    assert find_sae_folders([tmp_path / "run", a]) == [a, b]  # each once


def test_cli_evaluates_the_saes_without_a_report(tiny_lm_dir, text_file, tmp_path):
    """No --report: the SAEs (random, on the tiny LM) are scored by `python -m eval`'s run_eval."""
    metadata = {"model": str(tiny_lm_dir), "hookpoint": "transformer.h.1", "ctx_len": 16}
    for seed, (n, k) in enumerate((n, k) for k in (2, 4) for n in (32, 64, 128, 256)):
        random_sae(32, n_latents=n, k=k, seed=seed).save(tmp_path / "run" / f"n{n}-k{k}", metadata=metadata)
    eval_report = tmp_path / "eval.json"
    scaling = main([str(tmp_path / "run"), "--eval.dataset", str(text_file), "--eval.split", "train",
                    "--eval.tokens", "160", "--eval.out", str(eval_report), "--out", str(tmp_path / "fit")])
    reports = json.loads(eval_report.read_text())
    assert len(reports) == 8 and all(report["tokens"] == 150 for report in reports)
    assert [point["loss"] for point in scaling["points"]] == [report["fvu"] for report in reports]
    assert [point["sae"] for point in scaling["points"]] == [report["sae"] for report in reports]
    assert (tmp_path / "fit" / "scaling.json").is_file() and (tmp_path / "fit" / "scaling.svg").is_file()


def test_scaling_svg_escapes_and_draws_points_only_without_fits():
    svg = scaling_svg({"metric": "fvu", "points": [{"sae": "runs/<a>&b", "n_latents": 512, "k": 8, "loss": 0.4},
                                                   {"sae": "runs/c", "n_latents": 1024, "k": 8, "loss": 0.2},
                                                   {"sae": "runs/d", "n_latents": 4096, "k": 8, "loss": 0.05}]})
    root = ElementTree.fromstring(svg)
    assert "runs/<a>&b" in "".join(root.itertext())
    assert not root.findall("{http://www.w3.org/2000/svg}polyline")
    dots = [circle for circle in root.findall("{http://www.w3.org/2000/svg}circle") if circle.find("*") is not None]
    x, y = ([float(dot.get(axis)) for dot in dots] for axis in ("cx", "cy"))
    # both axes logarithmic: n and L halve (or quarter) by equal (or double) steps
    assert x[2] - x[1] == pytest.approx(2 * (x[1] - x[0]), abs=0.02)
    assert y[2] - y[1] == pytest.approx(2 * (y[1] - y[0]), abs=0.02)


def test_the_module_runs_as_a_command(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "eval.scaling", str(tmp_path / "missing")],
                               capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert completed.returncode == 2 and completed.stderr.strip() == f"error: run folder not found: {tmp_path / 'missing'}"
