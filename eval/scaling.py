"""Scaling laws of a sweep of SAEs: `python -m eval.scaling RUN_DIR [RUN_DIR ...] [--options]`.

    python -m eval.scaling runs/sweep --report report.json     # losses from `python -m eval ... --out report.json`
    python -m eval.scaling runs/k8 runs/k16 --eval.tokens 262144 # evaluates the SAEs itself (--eval.KEY: eval's options)

The law is Gao et al. 2024, "Scaling and evaluating sparse autoencoders", eq. 4: the loss of a TopK SAE
with n latents and k active ones is
    L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k),
a power law in n whose exponent beta_n + gamma log k depends on k, plus an irreducible loss that depends
on k alone (logs are natural). At one k it is L(n) = exp(a) n^b + c (`fit_width`).

Fitting. Nonlinear least squares on log L: residual_i = log L(theta; n_i, k_i) - log L_i. Losses of a
sweep span decades and their noise (seeds, token budgets) is roughly proportional to the loss, so log
residuals weigh every point by its relative error, where residuals on L would let the smallest SAEs,
with the largest losses, decide the fit alone. The solver is scipy's `least_squares` (trust region,
steps scaled by the Jacobian's columns as Levenberg-Marquardt's are) in float64 with the laws' exact
Jacobians, from a few deterministic starts (the irreducible loss a fraction of the smallest loss, then
a linear fit of log(L - irreducible); `_joint_starts`); the start that ends lowest is kept.
Uncertainty: with s^2 = RSS / (points - parameters) and J the Jacobian of the residuals at the fit,
the covariance is s^2 (J^T J)^-1, the asymptotic one (the model linearised at the fit, errors normal).
Each 95% interval is coefficient +- t standard errors with t the 97.5% quantile of Student's t with
points - parameters degrees of freedom: 1.96 (the normal's) for many points, but 2.57 with 5, where
the normal's would cover about 89%. Both stay approximations for a nonlinear law: the law is far
from linear over a sweep's range (the irreducible part most), so with noisier losses the intervals
cover the true coefficients less often than 95% (docs/metrics.md, "Scaling fits", has their coverage
on synthetic sweeps). Standard errors and intervals are null where J^T J is singular (the points cannot
tell some parameters apart).

The CLI finds every SAE folder (cfg.json + sae.safetensors, as the trainer writes RUN_DIR/HOOKPOINT or
RUN_DIR/VARIANT) at or under each RUN_DIR, reads n_latents and k from its cfg.json and its loss, the
report key --metric (default fvu, the normalized MSE Gao et al. fit), from --report, or else by
evaluating the SAEs on held-out text as `python -m eval` does. It fits the joint law when the sweep has
two or more k and enough points, and the width law at each k with 4 or more widths, says in one line what
it skipped and why, prints each fit, and writes scaling.json (points, fits with coefficients, standard
errors, 95% intervals and formula) and scaling.svg (log-log: points and fitted curves per k) into --out.
Those two files are this tool's own output: running it again replaces them (atomically, and it says so).
Nothing else is written but what --eval.* asks for as `python -m eval` would (--eval.out: its report).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit
from scipy.stats import t as student_t

from sae.config import parse_args
from sae.errors import MissingFileError, UsageError, run_cli
from sae.files import atomic_write, read_json
from sae.folder import CONFIG_FILE, WEIGHTS_FILE, read_sae_config, read_sae_metadata

from .__main__ import EvalConfig, run_eval, split_positionals
from .browse.svg import scaling_chart
from .report import write_report

# ----------------------------------------------------------------------------------------------
# The laws

LawFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Law:
    """A scaling law: its parameter names, how it is written, the log L it predicts and its Jacobian."""

    name: str
    parameters: tuple[str, ...]
    formula: str
    log_loss: LawFunction
    """(theta (p,), log_n (m,), log_k (m,)) -> log L (m,), float64."""
    jacobian: LawFunction
    """(theta (p,), log_n (m,), log_k (m,)) -> d log L_i / d theta_j (m, p), float64."""


def _joint_exponents(theta: np.ndarray, log_n: np.ndarray, log_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The logs (m,) of eq. 4's reducible and irreducible parts."""
    alpha, beta_k, beta_n, gamma, zeta, eta = theta
    return alpha + beta_k * log_k + beta_n * log_n + gamma * log_k * log_n, zeta + eta * log_k


def _joint_log_loss(theta: np.ndarray, log_n: np.ndarray, log_k: np.ndarray) -> np.ndarray:
    return np.logaddexp(*_joint_exponents(theta, log_n, log_k))  # log(e^r + e^i) without overflow


def _joint_jacobian(theta: np.ndarray, log_n: np.ndarray, log_k: np.ndarray) -> np.ndarray:
    reducible, irreducible = _joint_exponents(theta, log_n, log_k)
    # d log(e^r + e^i) = (e^r dr + e^i di) / (e^r + e^i): each part's share of L times its own gradient
    share, rest = expit(reducible - irreducible), expit(irreducible - reducible)
    return np.stack([share, share * log_k, share * log_n, share * log_k * log_n, rest, rest * log_k], axis=1)


def _width_log_loss(theta: np.ndarray, log_n: np.ndarray, log_k: np.ndarray) -> np.ndarray:
    a, b, c = theta
    with np.errstate(invalid="ignore", divide="ignore"):
        # NaN where a negative c makes L <= 0: the solver shrinks such steps, and no start is one
        return np.log(np.exp(a + b * log_n) + c)


def _width_jacobian(theta: np.ndarray, log_n: np.ndarray, log_k: np.ndarray) -> np.ndarray:
    a, b, c = theta
    power = np.exp(a + b * log_n)
    loss = power + c
    return np.stack([power / loss, power * log_n / loss, 1 / loss], axis=1)


JOINT = Law("joint", ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta"),
            "L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k)",
            _joint_log_loss, _joint_jacobian)
WIDTH = Law("width", ("a", "b", "c"), "L(n) = exp(a) n^b + c", _width_log_loss, _width_jacobian)
LAWS = {law.name: law for law in (JOINT, WIDTH)}

IRREDUCIBLE_FRACTIONS = (0.01, 0.25, 0.5, 0.75, 0.95)
"""Starts: the irreducible loss as these fractions of the smallest loss (near 0: a pure power law)."""

SOLVER_TOLERANCE = 1e-14
"""scipy's ftol, xtol and gtol: stop where the cost, the step or the gradient change by less than this
relative amount: a minimum to float64 precision. scipy's default, 1e-8, stops the joint law's
coefficients measurably short of the minimum (docs/metrics.md, "Scaling fits")."""


# ----------------------------------------------------------------------------------------------
# Fits


def _linear_fit(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares coefficients (q,) of target (m,) on the columns of design (m, q)."""
    return np.linalg.lstsq(design, target, rcond=None)[0]


def _as_values(name: str, values: Sequence[float], function: str) -> np.ndarray:
    """`values` as a float64 (m,) array; a UsageError unless every one is finite and positive."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise UsageError(f"{function}: {name} must be a list of numbers, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array) | (array <= 0))
    if len(bad):
        raise UsageError(f"{function}: {name} must be finite and positive (the fit is on logs), "
                         f"got {float(array[bad[0]])} at point {bad[0]}")
    return array


def _check_lengths(function: str, **columns: np.ndarray) -> None:
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        raise UsageError(f"{function}: one value per point in each of {', '.join(lengths)}, got lengths {lengths}")


def fit_joint(n_latents: Sequence[float], k: Sequence[float], loss: Sequence[float]) -> dict:
    """Fit Gao et al.'s eq. 4 (the module docstring) to m points by least squares on log L.

    n_latents, k, loss: (m,) positive numbers, m >= 7 distinct (n, k) points with >= 2 distinct k.
    Returns `fit_summary`'s dict for parameters alpha, beta_k, beta_n, gamma, zeta, eta.
    """
    n_values, k_values, losses = (_as_values(name, values, "fit_joint")
                                  for name, values in (("n_latents", n_latents), ("k", k), ("loss", loss)))
    _check_lengths("fit_joint", n_latents=n_values, k=k_values, loss=losses)
    distinct = len(set(zip(n_values.tolist(), k_values.tolist())))
    needed = len(JOINT.parameters) + 1
    if distinct < needed:
        raise UsageError(f"fit_joint needs at least {needed} distinct (n_latents, k) points for its "
                         f"{len(JOINT.parameters)} parameters, got {distinct}")
    for name, values in (("k", k_values), ("n_latents", n_values)):
        if len(set(values.tolist())) < 2:
            raise UsageError(f"fit_joint needs at least 2 distinct {name}, got only {values[0]:g}")
    log_n, log_k = np.log(n_values), np.log(k_values)
    return fit_summary(JOINT, log_n, log_k, losses, _joint_starts(log_n, log_k, losses))


def _joint_starts(log_n: np.ndarray, log_k: np.ndarray, losses: np.ndarray) -> list[np.ndarray]:
    """Starts (6,) for eq. 4. The irreducible loss exp(zeta + eta log k): eta the slope of each k's
    smallest loss on log k (where the irreducible part weighs most) and that +- 0.5, zeta such that it
    is a fraction of every loss (IRREDUCIBLE_FRACTIONS); then alpha, beta_k, beta_n, gamma by a linear
    fit of log(L - irreducible). The likelihood has several local minima that differ mostly in eta,
    so a single start at eta = 0 often ends in the wrong one (docs/metrics.md, "Scaling fits")."""
    distinct_k = np.unique(log_k)
    smallest = np.log([losses[log_k == value].min() for value in distinct_k])
    slope = _linear_fit(np.stack([np.ones_like(distinct_k), distinct_k], axis=1), smallest)[1]
    design = np.stack([np.ones_like(log_n), log_k, log_n, log_k * log_n], axis=1)
    starts = []
    for eta in (slope - 0.5, slope, slope + 0.5):
        for fraction in IRREDUCIBLE_FRACTIONS:
            zeta = math.log(fraction) + (np.log(losses) - eta * log_k).min()
            reducible = _linear_fit(design, np.log(losses - np.exp(zeta + eta * log_k)))
            starts.append(np.concatenate([reducible, [zeta, eta]]))
    return starts


def fit_width(n_latents: Sequence[float], loss: Sequence[float]) -> dict:
    """Fit L(n) = exp(a) n^b + c at one k to m points by least squares on log L.

    n_latents, loss: (m,) positive numbers, m >= 4 distinct widths. Returns `fit_summary`'s dict for
    parameters a, b, c.
    """
    n_values, losses = _as_values("n_latents", n_latents, "fit_width"), _as_values("loss", loss, "fit_width")
    _check_lengths("fit_width", n_latents=n_values, loss=losses)
    distinct, needed = len(set(n_values.tolist())), len(WIDTH.parameters) + 1
    if distinct < needed:
        raise UsageError(f"fit_width needs at least {needed} distinct widths for its {len(WIDTH.parameters)} "
                         f"parameters, got {distinct}")
    log_n = np.log(n_values)
    design = np.stack([np.ones_like(log_n), log_n], axis=1)
    starts = []
    for fraction in IRREDUCIBLE_FRACTIONS:
        c = fraction * losses.min()
        starts.append(np.append(_linear_fit(design, np.log(losses - c)), c))
    return fit_summary(WIDTH, log_n, np.zeros_like(log_n), losses, starts)


def fit_summary(law: Law, log_n: np.ndarray, log_k: np.ndarray, losses: np.ndarray,
                starts: list[np.ndarray]) -> dict:
    """Run the solver from each start (p,), keep the lowest cost, and describe that fit:

    law, formula, coefficients {name: value}, standard_errors {name: value or None}, ci95 {name: [low,
    high] or None} (asymptotic covariance, Student t quantile: the module docstring), rms_log_residual
    (RMS of log L_fit - log L, about the typical relative error), n_points, degrees_of_freedom (points -
    parameters), fitted (L_fit per point, in the order given), converged."""
    observed = np.log(losses)
    best = None
    for start in starts:
        # x_scale="jac": each parameter's step scaled by its Jacobian column (Marquardt's scaling), so that
        # alpha and gamma, whose column carries log k log n, move alike
        result = least_squares(lambda theta: law.log_loss(theta, log_n, log_k) - observed, start,
                               jac=lambda theta: law.jacobian(theta, log_n, log_k), method="trf", x_scale="jac",
                               ftol=SOLVER_TOLERANCE, xtol=SOLVER_TOLERANCE, gtol=SOLVER_TOLERANCE, max_nfev=1000)
        cost = float(result.fun @ result.fun)
        if best is None or cost < best[0]:  # ties keep the earlier start: deterministic
            best = (cost, result)
    cost, result = best
    theta = result.x
    points, n_parameters = len(losses), len(law.parameters)
    degrees_of_freedom = points - n_parameters
    covariance = _covariance(law.jacobian(theta, log_n, log_k), cost / degrees_of_freedom)
    errors = [None] * n_parameters if covariance is None else np.sqrt(covariance.diagonal()).tolist()
    coefficients = dict(zip(law.parameters, theta.tolist()))
    half_width = float(student_t.ppf(0.975, degrees_of_freedom))
    return {
        "law": law.name,
        "formula": law.formula,
        "coefficients": coefficients,
        "standard_errors": dict(zip(law.parameters, errors)),
        "ci95": {name: None if error is None else [value - half_width * error, value + half_width * error]
                 for (name, value), error in zip(coefficients.items(), errors)},
        "rms_log_residual": math.sqrt(cost / points),
        "n_points": points,
        "degrees_of_freedom": degrees_of_freedom,
        "fitted": np.exp(law.log_loss(theta, log_n, log_k)).tolist(),
        "converged": bool(result.status > 0),  # 0: max_nfev reached, < 0: bad input
    }


def _covariance(jacobian_at: np.ndarray, noise_variance: float) -> np.ndarray | None:
    """s^2 (J^T J)^-1 for the Jacobian (m, p) of the residuals, or None where J^T J is singular.

    Computed on J^T J scaled to a unit diagonal, so that singular means the parameters cannot be told
    apart, not that their columns differ in scale."""
    curvature = jacobian_at.T @ jacobian_at
    inverse_root = 1 / np.sqrt(np.maximum(curvature.diagonal(), 1e-300))
    rescale = np.outer(inverse_root, inverse_root)
    scaled = curvature * rescale
    if np.linalg.eigvalsh(scaled).min() <= 1e-12:
        return None
    return noise_variance * np.linalg.inv(scaled) * rescale


def predict(fit: dict, n_latents: Sequence[float], k: float = 1.0) -> list[float]:
    """The loss a fit (from `fit_joint` or `fit_width`, or its JSON) predicts at each width, at k."""
    law = LAWS[fit["law"]]
    theta = np.array([fit["coefficients"][name] for name in law.parameters], dtype=np.float64)
    log_n = np.log(np.asarray(n_latents, dtype=np.float64))
    return np.exp(law.log_loss(theta, log_n, np.full_like(log_n, math.log(k)))).tolist()


# ----------------------------------------------------------------------------------------------
# The sweep: SAE folders, their losses, the fits


def find_sae_folders(run_dirs: Sequence[str | Path]) -> list[Path]:
    """Every SAE folder (cfg.json and sae.safetensors) that is or lies under one of `run_dirs`, each once,
    sorted within each RUN_DIR. Hidden folders (temporary writes) are skipped; checkpoints hold no cfg.json."""
    folders: dict[Path, Path] = {}
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise MissingFileError(f"run folder not found: {run_dir}")
        for config in sorted(run_dir.rglob(CONFIG_FILE)):
            relative = config.parent.relative_to(run_dir).parts
            if (config.parent / WEIGHTS_FILE).is_file() and not any(part.startswith(".") for part in relative):
                folders.setdefault(config.parent.resolve(), config.parent)
    if not folders:
        raise UsageError(f"no SAE folder ({CONFIG_FILE} + {WEIGHTS_FILE}) in {', '.join(map(str, run_dirs))}")
    return list(folders.values())


def read_points(folders: list[Path]) -> list[dict]:
    """{"sae", "n_latents", "k", "tokens_trained"} of each SAE folder, from its cfg.json. A UsageError when
    they reconstruct different activations (model, hookpoint or width): one law per hookpoint."""
    points, sources = [], {}
    for folder in folders:
        cfg, metadata = read_sae_config(folder), read_sae_metadata(folder)
        sources.setdefault((metadata.get("model"), metadata.get("hookpoint"), cfg.d_in), folder)
        points.append({"sae": str(folder), "n_latents": cfg.n_latents, "k": cfg.k,
                       "tokens_trained": metadata.get("tokens_trained")})
    if len(sources) > 1:
        described = "; ".join(f"{folder}: model {model}, hookpoint {hookpoint}, d_in {d_in}"
                              for (model, hookpoint, d_in), folder in sources.items())
        raise UsageError(f"the SAEs reconstruct different activations ({described}): fit one hookpoint at a "
                         "time, e.g. name RUN_DIR/HOOKPOINT")
    return points


def _metric_value(entry: dict, metric: str, where: str) -> float:
    """entry[metric] as a positive float; a UsageError naming `where` otherwise."""
    if metric not in entry:
        numeric = sorted(key for key, value in entry.items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool))
        raise UsageError(f"{where} has no key '{metric}'; its numeric keys: {', '.join(numeric)}")
    value = entry[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UsageError(f"{where}: '{metric}' is {value!r}; a scaling law needs a positive number")
    return float(value)


def losses_from_report(report_path: str | Path, folders: list[Path], metric: str) -> list[float]:
    """Each folder's `metric` from a JSON report of `python -m eval --out` (one object or a list, each
    with "sae": the folder as eval was given it, relative to the working directory or absolute)."""
    content = read_json(report_path, "report")
    entries = content if isinstance(content, list) else [content]
    by_folder = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("sae"), str):
            raise UsageError(f"{report_path}: entry {index} is not an eval report (an object with 'sae': the SAE folder)")
        by_folder[Path(entry["sae"]).resolve()] = entry
    losses = []
    for folder in folders:
        entry = by_folder.get(folder.resolve())
        if entry is None:
            raise UsageError(f"{report_path} has no report of {folder}: evaluate it (python -m eval ... --out) "
                             "or leave out --report to evaluate every SAE here")
        losses.append(_metric_value(entry, metric, f"the report of {folder} in {report_path}"))
    return losses


def losses_by_evaluating(eval_cfg: EvalConfig, folders: list[Path], metric: str) -> list[float]:
    """Each folder's `metric`, evaluated on held-out text by `python -m eval`'s `run_eval` (all the SAEs
    on the same tokens); its report is also written to eval_cfg.out when that is set."""
    reports = run_eval(eval_cfg, [str(folder) for folder in folders])
    if eval_cfg.out:
        print(f"eval report written to {write_report(eval_cfg.out, reports)}")
    return [_metric_value(report, metric, f"the eval report of {folder}") for report, folder in zip(reports, folders)]


def fit_sweep(points: list[dict]) -> tuple[list[dict], list[str]]:
    """(fits, skipped) for points {"n_latents", "k", "loss", ...}: the joint law over all of them and the
    width law at each k, each fit with "points" (indices into `points`) and, for a width law, "k";
    `skipped` says why a law was not fitted (the fits' own UsageErrors: too few points, one k)."""
    fits, skipped = [], []
    try:
        joint = fit_joint([p["n_latents"] for p in points], [p["k"] for p in points], [p["loss"] for p in points])
        fits.append({**joint, "points": list(range(len(points)))})
    except UsageError as reason:
        skipped.append(f"joint law ({reason})")
    for k in sorted({p["k"] for p in points}):
        indices = [i for i, p in enumerate(points) if p["k"] == k]
        try:
            width = fit_width([points[i]["n_latents"] for i in indices], [points[i]["loss"] for i in indices])
            fits.append({**width, "k": k, "points": indices})
        except UsageError as reason:
            skipped.append(f"width law at k={k} ({reason})")
    return fits, skipped


# ----------------------------------------------------------------------------------------------
# Presenting: the table and the log-log plot


def fit_table(fit: dict, metric: str = "loss") -> str:
    """A fit as text: its law, quality, and one row per coefficient with standard error and 95% interval."""
    at = f" at k={fit['k']}" if "k" in fit else ""
    lines = [f"{fit['law']} law{at}: {fit['formula']}   (L = {metric})",
             f"  {fit['n_points']} points, RMS log residual {fit['rms_log_residual']:.4f}"
             + ("" if fit["converged"] else "  WARNING: the solver did not converge"),
             f"  {'parameter':<10} {'value':>10} {'std err':>10}   95% interval (asymptotic)"]
    for name, value in fit["coefficients"].items():
        error, interval = fit["standard_errors"][name], fit["ci95"][name]
        shown_error = "n/a" if error is None else f"{error:.4g}"
        shown_interval = "not identifiable" if interval is None else f"[{interval[0]:.4g}, {interval[1]:.4g}]"
        lines.append(f"  {name:<10} {value:>10.4g} {shown_error:>10}   {shown_interval}")
    return "\n".join(lines)


_CURVE_SAMPLES = 48


def _fit_curves(fit_json: dict) -> list[tuple[str, bool, list[tuple[float, float]]]]:
    """("k=K", dashed, [(n, L) ...]) of each fitted curve of a scaling.json dict: the joint law (solid) at
    every k of the points, over all their widths; each width law (dashed) over its own points' widths."""
    points = fit_json["points"]
    curves = []
    for fit in fit_json.get("fits", []):
        widths = [points[i]["n_latents"] for i in fit["points"]]
        low, high = math.log(min(widths)), math.log(max(widths))
        grid = [math.exp(low + (high - low) * i / (_CURVE_SAMPLES - 1)) for i in range(_CURVE_SAMPLES)]
        ks = sorted({p["k"] for p in points}) if fit["law"] == "joint" else [fit["k"]]
        for k in ks:
            curves.append((f"k={k}", fit["law"] != "joint", list(zip(grid, predict(fit, grid, k)))))
    return curves


def scaling_svg(fit_json: dict) -> str:
    """A log-log SVG of a scaling.json dict ({"metric", "points", "fits"}; fits may be absent): each SAE a
    dot coloured by its k, the joint law's curve at each k solid, each width law's dashed; a legend below.
    Self-contained (no external resources), so the latent browser can inline it."""
    points, metric = fit_json["points"], fit_json.get("metric", "loss")
    dots = [(p["n_latents"], p["loss"], f"k={p['k']}",
             f"{p['sae']}: n={p['n_latents']}, k={p['k']}, {metric}={p['loss']:.4g}") for p in points]
    return scaling_chart(f"{metric} vs latents ({len(points)} SAEs)", dots, _fit_curves(fit_json),
                         [f"k={k}" for k in sorted({p["k"] for p in points})], "latents n (log scale)",
                         f"{metric} (log scale)", "solid: joint law L(n, k); dashed: width law at one k")


# ----------------------------------------------------------------------------------------------
# The CLI


@dataclass(frozen=True)
class ScalingConfig:
    """Options of `python -m eval.scaling`."""

    report: str = ""
    """JSON of `python -m eval SAE_DIR ... --out FILE` holding every SAE's metrics; empty: evaluate them here."""

    metric: str = "fvu"
    """Report key to fit (positive; fvu is the normalized MSE that Gao et al. fit)."""

    out: str = ""
    """Folder for scaling.json and scaling.svg (default: the first RUN_DIR); a rerun replaces both."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """How SAEs are evaluated without --report: `python -m eval`'s options."""

    def __post_init__(self):
        if self.report and self.eval != EvalConfig():
            raise ValueError("--eval.* options evaluate the SAEs, --report reads their losses: give one of them")
        if self.eval.wandb:
            raise ValueError("--eval.wandb is not supported here: write the report with python -m eval --wandb")


def main(argv: list[str] | None = None) -> dict:
    """`python -m eval.scaling` (the module docstring); returns what it writes to scaling.json."""
    run_dirs, options = split_positionals(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(options, ScalingConfig, usage=__doc__)
    if not run_dirs:
        raise UsageError("name one or more run folders: python -m eval.scaling RUN_DIR [RUN_DIR ...] [--options]; "
                         "--help lists the options")
    folders = find_sae_folders(run_dirs)
    points = read_points(folders)
    if cfg.report:
        losses = losses_from_report(cfg.report, folders, cfg.metric)
    else:
        losses = losses_by_evaluating(cfg.eval, folders, cfg.metric)
    for point, loss in zip(points, losses):
        point["loss"] = loss
    fits, skipped = fit_sweep(points)
    if not fits:
        raise UsageError(f"nothing to fit among {len(points)} SAEs: " + "; ".join(skipped))
    if skipped:
        print("skipped: " + "; ".join(skipped))
    if len({point["tokens_trained"] for point in points}) > 1:
        print("note: the SAEs were trained on different numbers of tokens; the law then mixes width and training length")
    for fit in fits:
        print(fit_table(fit, cfg.metric))
    scaling = {"metric": cfg.metric, "source": cfg.report or "evaluated on held-out text (python -m eval)",
               "points": points, "fits": fits, "skipped": skipped}
    out = Path(cfg.out or run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    outputs = {"scaling.json": json.dumps(scaling, indent=2) + "\n", "scaling.svg": scaling_svg(scaling) + "\n"}
    for name, content in outputs.items():
        path = out / name
        replaced = path.exists()
        atomic_write(path, lambda tmp: Path(tmp).write_text(content))
        print(f"wrote {path}" + (" (replacing this tool's previous output)" if replaced else ""))
    return scaling


if __name__ == "__main__":
    run_cli(main)
