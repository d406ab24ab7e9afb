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
with the largest losses, decide the fit alone. The solver is Levenberg-Marquardt in float64 with
autograd Jacobians, from a few deterministic starts (the irreducible loss a fraction of the smallest
loss, then a linear fit of log(L - irreducible); `_joint_starts`); the start that ends lowest is kept.
Uncertainty: with s^2 = RSS / (points - parameters) and J the Jacobian of the residuals at the fit,
the covariance is s^2 (J^T J)^-1, the asymptotic one (the model linearised at the fit, errors normal).
Each 95% interval is coefficient +- t standard errors with t the 97.5% quantile of Student's t with
points - parameters degrees of freedom: 1.96 (the normal's) for many points, but 2.57 with 5, where
the normal's would cover about 89%. Both stay approximations for a nonlinear law: on 100 synthetic
sweeps of 5 widths x 4 k the joint law's intervals held the true coefficients 96-97% of the time with
0.2% noise, but only 76-86% with 1% noise, where the estimates spread 1.2-1.4 times their standard
errors (the law is far from linear over that range, the irreducible part most). Standard errors and
intervals are null where J^T J is singular (the points cannot tell some parameters apart).

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

import torch
from torch import Tensor

from sae.config import parse_args
from sae.errors import MissingFileError, UsageError, run_cli
from sae.files import atomic_write, read_json
from sae.model import CONFIG_FILE, WEIGHTS_FILE, read_sae_config, read_sae_metadata

from .__main__ import EvalConfig, run_eval, split_positionals
from .browse.svg import SERIES_COLOURS, esc, nice_ticks, svg_text
from .report import write_report

# ----------------------------------------------------------------------------------------------
# The laws


@dataclass(frozen=True)
class Law:
    """A scaling law: its parameter names, how it is written, and the log L it predicts."""

    name: str
    parameters: tuple[str, ...]
    formula: str
    log_loss: Callable[[Tensor, Tensor, Tensor], Tensor]
    """(theta, log_n (m,), log_k (m,)) -> log L (m,), all float64. theta is (p,), or (m, p) with row i
    the parameters of point i (how `jacobian` gets every row of J from one backward pass)."""


def _joint_log_loss(theta: Tensor, log_n: Tensor, log_k: Tensor) -> Tensor:
    alpha, beta_k, beta_n, gamma, zeta, eta = theta.unbind(-1)
    reducible = alpha + beta_k * log_k + beta_n * log_n + gamma * log_k * log_n
    irreducible = zeta + eta * log_k
    return torch.logaddexp(reducible, irreducible)  # log(e^reducible + e^irreducible) without overflow


def _width_log_loss(theta: Tensor, log_n: Tensor, log_k: Tensor) -> Tensor:
    a, b, c = theta.unbind(-1)
    # NaN where a negative c makes L <= 0: the solver refuses such steps, and no start is one
    return torch.log(torch.exp(a + b * log_n) + c)


JOINT = Law("joint", ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta"),
            "L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k)",
            _joint_log_loss)
WIDTH = Law("width", ("a", "b", "c"), "L(n) = exp(a) n^b + c", _width_log_loss)
LAWS = {law.name: law for law in (JOINT, WIDTH)}

IRREDUCIBLE_FRACTIONS = (0.01, 0.25, 0.5, 0.75, 0.95)
"""Starts: the irreducible loss as these fractions of the smallest loss (near 0: a pure power law)."""


# ----------------------------------------------------------------------------------------------
# Levenberg-Marquardt


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """a^T b (p, q) for a (m, p) and b (m, q), as a product and a sum rather than a BLAS matmul: on
    matrices this small BLAS threads only add synchronisation (a (20, 6) float64 J^T J took 10 ms with
    2 threads on this 2-core machine under load, 0.1 ms with one)."""
    return (a[:, :, None] * b[:, None, :]).sum(0)


def jacobian(residuals: Callable[[Tensor], Tensor], theta: Tensor, points: int) -> Tensor:
    """d residuals_i / d theta_j (points, p) at theta (p,), for residuals that take one row of
    parameters per point ((points, p) -> (points,), row i used by residual i only, as `Law.log_loss`).

    Every point gets its own copy of theta, so one backward pass of the residuals' sum puts row i of J
    in the gradient of copy i. (torch.func.jacrev would do it too, but its first call imports some
    900 modules: 3 to 11 s on this machine.)"""
    copies = theta.detach().expand(points, -1).clone().requires_grad_()
    residuals(copies).sum().backward()
    return copies.grad


def levenberg_marquardt(residuals: Callable[[Tensor], Tensor], start: Tensor,
                        max_iterations: int = 500) -> tuple[Tensor, bool]:
    """Minimise sum(residuals(theta)^2) from `start` (p,) float64; returns (theta (p,), converged).
    `residuals` takes theta (p,), or one row per residual (`jacobian`).

    Each step solves (J^T J + damping D) step = -J^T r with D = diag(J^T J) (Marquardt's scaling, so that
    parameters of different scales, alpha next to gamma whose column carries log k log n, are damped
    alike). The damping follows Nielsen's rule (Madsen, Nielsen & Tingleff 2004, "Methods for non-linear
    least squares problems", sec. 3.2): after a step that lowers the cost, it shrinks by up to 3 as far
    as the actual decrease matches the quadratic model's prediction; a step that does not, or that makes
    the cost non-finite (the log of a negative prediction), is refused and the damping grows, faster
    each time. Converged: the cost stopped falling (relative decrease below 1e-10), the fit is exact to
    float64 precision, the step became negligible, or no step lowers the cost even at a damping where
    it is a tiny gradient step (a minimum to float64 precision).
    """
    theta = start.clone()
    r = residuals(theta)
    cost = float(r.square().sum())
    damping, growth = 1e-3, 2.0
    for _ in range(max_iterations):
        jacobian_at = jacobian(residuals, theta, len(r))  # (m, p)
        gradient, curvature = _gram(jacobian_at, r[:, None])[:, 0], _gram(jacobian_at, jacobian_at)
        diagonal = curvature.diagonal()
        scale = torch.diag(diagonal.clamp_min(1e-12 * float(diagonal.max()) + 1e-300))
        while True:
            step = torch.linalg.solve(curvature + damping * scale, -gradient)
            trial_r = residuals(theta + step)
            trial_cost = float(trial_r.square().sum())
            if math.isfinite(trial_cost) and trial_cost < cost:
                break
            damping, growth = damping * growth, growth * 2
            if damping > 1e16:
                return theta, True
        # the decrease the linearised residuals predict: -(2 g.step + step.C.step)
        predicted = -float((2 * gradient + _gram(curvature, step[:, None])[:, 0]).mul(step).sum())
        gain = (cost - trial_cost) / predicted if predicted > 0 else 1.0
        damping, growth = damping * max(1 / 3, 1 - (2 * gain - 1) ** 3), 2.0
        decrease = cost - trial_cost
        theta, r, cost = theta + step, trial_r, trial_cost
        if (decrease <= 1e-10 * (cost + decrease) or cost <= 1e-28 * len(r)
                or float(step.norm()) <= 1e-12 * (float(theta.norm()) + 1e-12)):
            return theta, True
    return theta, False


def student_t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The `probability` quantile (in (0.5, 1)) of Student's t with `degrees_of_freedom`: bisection on its
    CDF, 1/2 + the integral of the density from 0 (Simpson's rule, 400 intervals: errors below 1e-9),
    as scipy is no dependency."""
    nu = float(degrees_of_freedom)
    log_norm = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    intervals = 400

    def cdf(q: float) -> float:
        h = q / intervals
        density = [math.exp(log_norm - (nu + 1) / 2 * math.log1p((i * h) ** 2 / nu)) for i in range(intervals + 1)]
        simpson = density[0] + density[-1] + 4 * math.fsum(density[1:-1:2]) + 2 * math.fsum(density[2:-1:2])
        return 0.5 + simpson * h / 3

    low, high = 0.0, 2.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


# ----------------------------------------------------------------------------------------------
# Fits


def _linear_fit(design: Tensor, target: Tensor) -> Tensor:
    """Least-squares coefficients (q,) of target (m,) on the columns of design (m, q), by the normal
    equations: precise enough for a start, and deterministic where torch.linalg.lstsq is not (its
    results changed in the last bits between identical calls, even on one thread)."""
    return torch.linalg.solve(_gram(design, design), _gram(design, target[:, None])[:, 0])


def _as_values(name: str, values: Sequence[float], function: str) -> Tensor:
    """`values` as a float64 (m,) tensor; a UsageError unless every one is finite and positive."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if tensor.dim() != 1:
        raise UsageError(f"{function}: {name} must be a list of numbers, got shape {tuple(tensor.shape)}")
    bad = (~torch.isfinite(tensor) | (tensor <= 0)).nonzero()
    if len(bad):
        index = int(bad[0])
        raise UsageError(f"{function}: {name} must be finite and positive (the fit is on logs), "
                         f"got {float(tensor[index])} at point {index}")
    return tensor


def _check_lengths(function: str, **columns: Tensor) -> None:
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
            raise UsageError(f"fit_joint needs at least 2 distinct {name}, got only {values[0].item():g}")
    log_n, log_k = n_values.log(), k_values.log()
    return fit_summary(JOINT, log_n, log_k, losses, _joint_starts(log_n, log_k, losses))


def _joint_starts(log_n: Tensor, log_k: Tensor, losses: Tensor) -> list[Tensor]:
    """Starts (6,) for eq. 4. The irreducible loss exp(zeta + eta log k): eta the slope of each k's
    smallest loss on log k (where the irreducible part weighs most) and that +- 0.5, zeta such that it
    is a fraction of every loss (IRREDUCIBLE_FRACTIONS); then alpha, beta_k, beta_n, gamma by a linear
    fit of log(L - irreducible). The likelihood has several local minima that differ mostly in eta:
    on synthetic sweeps from five laws (eta -2 to 1), starts at eta = 0 alone missed the best in half
    of them, these missed none of 60."""
    distinct_k = torch.unique(log_k)
    smallest = torch.stack([losses[log_k == value].min() for value in distinct_k]).log()
    slope = float(_linear_fit(torch.stack([torch.ones_like(distinct_k), distinct_k], dim=1), smallest)[1])
    design = torch.stack([torch.ones_like(log_n), log_k, log_n, log_k * log_n], dim=1)
    starts = []
    for eta in (slope - 0.5, slope, slope + 0.5):
        for fraction in IRREDUCIBLE_FRACTIONS:
            zeta = math.log(fraction) + float((losses.log() - eta * log_k).min())
            reducible = _linear_fit(design, torch.log(losses - torch.exp(zeta + eta * log_k)))
            starts.append(torch.cat([reducible, torch.tensor([zeta, eta], dtype=torch.float64)]))
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
    log_n = n_values.log()
    design = torch.stack([torch.ones_like(log_n), log_n], dim=1)
    starts = []
    for fraction in IRREDUCIBLE_FRACTIONS:
        c = fraction * losses.min()
        a, b = _linear_fit(design, torch.log(losses - c))
        starts.append(torch.stack([a, b, c]))
    return fit_summary(WIDTH, log_n, torch.zeros_like(log_n), losses, starts)


def fit_summary(law: Law, log_n: Tensor, log_k: Tensor, losses: Tensor, starts: list[Tensor]) -> dict:
    """Run the solver from each start (p,), keep the lowest cost, and describe that fit:

    law, formula, coefficients {name: value}, standard_errors {name: value or None}, ci95 {name: [low,
    high] or None} (asymptotic covariance, Student t quantile: the module docstring), rms_log_residual
    (RMS of log L_fit - log L, about the typical relative error), n_points, degrees_of_freedom (points -
    parameters), fitted (L_fit per point, in the order given), converged."""
    observed = losses.log()

    def residuals(theta: Tensor) -> Tensor:
        return law.log_loss(theta, log_n, log_k) - observed

    best = None
    for start in starts:
        theta, converged = levenberg_marquardt(residuals, start)
        cost = float(residuals(theta).square().sum())
        if best is None or cost < best[0]:  # ties keep the earlier start: deterministic
            best = (cost, theta, converged)
    cost, theta, converged = best
    points, n_parameters = len(losses), len(law.parameters)
    degrees_of_freedom = points - n_parameters
    covariance = _covariance(jacobian(residuals, theta, points), cost / degrees_of_freedom)
    errors = [None] * n_parameters if covariance is None else covariance.diagonal().sqrt().tolist()
    coefficients = dict(zip(law.parameters, theta.tolist()))
    half_width = student_t_quantile(0.975, degrees_of_freedom)
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
        "fitted": law.log_loss(theta, log_n, log_k).exp().tolist(),
        "converged": converged,
    }


def _covariance(jacobian_at: Tensor, noise_variance: float) -> Tensor | None:
    """s^2 (J^T J)^-1 for the Jacobian (m, p) of the residuals, or None where J^T J is singular.

    Computed on J^T J scaled to a unit diagonal, so that singular means the parameters cannot be told
    apart, not that their columns differ in scale."""
    curvature = _gram(jacobian_at, jacobian_at)
    inverse_root = curvature.diagonal().clamp_min(1e-300).rsqrt()
    scaled = curvature * inverse_root[:, None] * inverse_root[None, :]
    if float(torch.linalg.eigvalsh(scaled).min()) <= 1e-12:
        return None
    return noise_variance * torch.linalg.inv(scaled) * inverse_root[:, None] * inverse_root[None, :]


def predict(fit: dict, n_latents: Sequence[float], k: float = 1.0) -> list[float]:
    """The loss a fit (from `fit_joint` or `fit_width`, or its JSON) predicts at each width, at k."""
    law = LAWS[fit["law"]]
    theta = torch.tensor([fit["coefficients"][name] for name in law.parameters], dtype=torch.float64)
    log_n = torch.as_tensor(n_latents, dtype=torch.float64).log()
    return law.log_loss(theta, log_n, torch.full_like(log_n, math.log(k))).exp().tolist()


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


PLOT_COLOURS = SERIES_COLOURS + ["#c0392b", "#16a085", "#7f8c8d", "#b8860b"]
"""One colour per k (the browser's four first)."""

_WIDTH, _HEIGHT, _LEFT, _RIGHT, _TOP, _BOTTOM = 520, 320, 64, 16, 30, 46
_CURVE_SAMPLES = 48


def _power_of_two_ticks(low: float, high: float) -> list[float]:
    """Powers of two within [low, high], thinned to at most 8."""
    exponents = list(range(math.ceil(math.log2(low) - 1e-9), math.floor(math.log2(high) + 1e-9) + 1))
    stride = max(1, math.ceil(len(exponents) / 8))
    return [2.0 ** e for e in exponents[::stride]] or [low, high]


def _decimal_log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 times powers of ten within [low, high]; all nine mantissas if that gives fewer than 3, and
    linear ticks if that still gives fewer than 2."""
    for mantissas, enough in (((1, 2, 5), 3), (range(1, 10), 2)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
                 for m in mantissas if low * (1 - 1e-9) <= m * 10.0 ** e <= high * (1 + 1e-9)]
        if len(ticks) >= enough:
            return ticks
    return [tick for tick in nice_ticks(low, high) if low <= tick <= high and tick > 0]


def _fit_curves(fit_json: dict) -> list[tuple[float, bool, list[tuple[float, float]]]]:
    """(k, is_joint, [(n, L) ...]) of each fitted curve of a scaling.json dict: the joint law at every k
    of the points, over all their widths; each width law over its own points' widths."""
    points = fit_json["points"]
    curves = []
    for fit in fit_json.get("fits", []):
        widths = [points[i]["n_latents"] for i in fit["points"]]
        low, high = math.log(min(widths)), math.log(max(widths))
        grid = [math.exp(low + (high - low) * i / (_CURVE_SAMPLES - 1)) for i in range(_CURVE_SAMPLES)]
        ks = sorted({p["k"] for p in points}) if fit["law"] == "joint" else [fit["k"]]
        for k in ks:
            curves.append((k, fit["law"] == "joint", list(zip(grid, predict(fit, grid, k)))))
    return curves


def scaling_svg(fit_json: dict) -> str:
    """A log-log SVG of a scaling.json dict ({"metric", "points", "fits"}; fits may be absent): each SAE a
    dot coloured by its k, the joint law's curve at each k solid, each width law's dashed; a legend below.
    Self-contained (no external resources), so the latent browser can inline it."""
    points, metric = fit_json["points"], fit_json.get("metric", "loss")
    ks = sorted({p["k"] for p in points})
    colour = {k: PLOT_COLOURS[index % len(PLOT_COLOURS)] for index, k in enumerate(ks)}
    curves = _fit_curves(fit_json)
    xs = [p["n_latents"] for p in points]
    ys = [p["loss"] for p in points] + [loss for _, _, curve in curves for _, loss in curve]
    x_low, x_high = min(xs) / 1.15, max(xs) * 1.15
    y_low, y_high = min(ys) / 1.08, max(ys) * 1.08
    plot_bottom, plot_right = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT

    def x_pixel(n: float) -> float:
        return round(_LEFT + math.log(n / x_low) / math.log(x_high / x_low) * (plot_right - _LEFT), 2)

    def y_pixel(loss: float) -> float:
        return round(plot_bottom - math.log(loss / y_low) / math.log(y_high / y_low) * (plot_bottom - _TOP), 2)

    title = f"{metric} vs latents ({len(points)} SAEs)"
    parts = [f'<text x="{_LEFT}" y="18" font-size="13" font-weight="bold">{esc(title)}</text>']
    for tick in _decimal_log_ticks(y_low, y_high):
        y = y_pixel(tick)
        parts.append(f'<line x1="{_LEFT}" y1="{y}" x2="{plot_right}" y2="{y}" stroke="#eee"/>')
        parts.append(svg_text(_LEFT - 6, y + 4, f"{tick:g}", "end"))
    for tick in _power_of_two_ticks(x_low, x_high):
        x = x_pixel(tick)
        parts.append(f'<line x1="{x}" y1="{plot_bottom}" x2="{x}" y2="{plot_bottom + 4}" stroke="#333"/>')
        parts.append(svg_text(x, plot_bottom + 16, f"{tick:g}", "middle"))
    parts.append(f'<line x1="{_LEFT}" y1="{plot_bottom}" x2="{plot_right}" y2="{plot_bottom}" stroke="#333"/>')
    parts.append(f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{plot_bottom}" stroke="#333"/>')
    parts.append(svg_text((_LEFT + plot_right) / 2, plot_bottom + 32, "latents n (log scale)", "middle"))
    middle = (_TOP + plot_bottom) / 2
    parts.append(svg_text(14, middle, f"{metric} (log scale)", "middle", f' transform="rotate(-90 14 {middle})"'))
    for k, is_joint, curve in curves:
        dash = "" if is_joint else ' stroke-dasharray="5,3"'
        coordinates = " ".join(f"{x_pixel(n)},{y_pixel(loss)}" for n, loss in curve)
        parts.append(f'<polyline fill="none" stroke="{colour[k]}" stroke-width="1.5"{dash} points="{coordinates}"/>')
    for p in points:
        tooltip = f"{p['sae']}: n={p['n_latents']}, k={p['k']}, {metric}={p['loss']:.4g}"
        parts.append(f'<circle cx="{x_pixel(p["n_latents"])}" cy="{y_pixel(p["loss"])}" r="3" fill="{colour[p["k"]]}">'
                     f'<title>{esc(tooltip)}</title></circle>')
    legend_row = _HEIGHT + 8
    for index, k in enumerate(ks):
        left = _LEFT + 62 * index
        parts.append(f'<circle cx="{left}" cy="{legend_row}" r="3" fill="{colour[k]}"/>')
        parts.append(svg_text(left + 7, legend_row + 4, f"k={k}"))
    parts.append(svg_text(_LEFT, legend_row + 20, "solid: joint law L(n, k); dashed: width law at one k"))
    height = _HEIGHT + 34
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {_WIDTH} {height}" width="{_WIDTH}" '
            f'height="{height}" role="img" font-family="sans-serif"><title>{esc(title)}</title>' + "".join(parts) + "</svg>")


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
