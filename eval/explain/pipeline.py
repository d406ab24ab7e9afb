"""Explain and score many units: SAE latents, the LM's MLP neurons at the same layer (the baseline a
reader compares against), and a shuffled-explanation control (each latent scored with another
latent's explanation: what a score looks like when the explanation is not about the unit).

    records  = latent_records(model, tokenizer, sae, hookpoint, windows, n_units=50)
    results, summary = explain_and_score(records, TokenLookupExplainer(), {"embedding": EmbeddingSimulator()})
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from sae.files import atomic_write
from sae.errors import UsageError
from sae.model import SparseAutoencoder

from .records import (
    TokenStrings, UnitRecords, collect_records, latent_fire_counts, mlp_neuron_module, module_unit_activations,
    sae_latent_activations,
)
from .scoring import score_unit


def pick(candidates: list[int], count: int, seed: int) -> list[int]:
    """`count` of `candidates` at random (seeded), in increasing order."""
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    return sorted(chosen)


def latent_records(model: nn.Module, tokenizer, sae: SparseAutoencoder, hookpoint: str, windows: Tensor,
                   n_units: int = 50, latents: list[int] | None = None, seed: int = 0, batch_windows: int = 32) -> list[UnitRecords]:
    """Records of `latents`, or of `n_units` latents drawn at random among those alive on `windows`."""
    if latents is None:
        counts = latent_fire_counts(model, hookpoint, sae, windows, batch_windows)
        latents = pick(torch.nonzero(counts).flatten().tolist(), n_units, seed)
    bad = [latent for latent in latents if not 0 <= latent < sae.cfg.n_latents]
    if bad:
        raise UsageError(f"latent ids {bad} are out of range for an SAE with {sae.cfg.n_latents} latents")
    activations = sae_latent_activations(model, hookpoint, sae, latents)
    return collect_records(windows, activations, latents, TokenStrings(tokenizer), "latent", batch_windows=batch_windows, seed=seed)


def neuron_records(model: nn.Module, tokenizer, hookpoint: str, windows: Tensor, n_units: int = 50, seed: int = 0,
                   module_name: str | None = None, batch_windows: int = 32) -> list[UnitRecords]:
    """Records of `n_units` random MLP neurons of the hookpoint's block (GPT-2: transformer.h.L.mlp.act)."""
    from sae.activations import capture_activations, get_module

    module_name = module_name or mlp_neuron_module(hookpoint)
    width = capture_activations(model, get_module(model, module_name), windows[:1, :2].to(next(model.parameters()).device)).shape[-1]
    neurons = pick(list(range(width)), n_units, seed)
    activations = module_unit_activations(model, module_name, neurons)
    return collect_records(windows, activations, neurons, TokenStrings(tokenizer), "neuron", batch_windows=batch_windows, seed=seed)


def derangement(count: int, seed: int) -> list[int]:
    """A permutation with no fixed point (identity when count < 2)."""
    if count < 2:
        return list(range(count))
    rng = random.Random(seed)
    while True:
        order = list(range(count))
        rng.shuffle(order)
        if all(index != value for index, value in enumerate(order)):
            return order


def explain_and_score(records: list[UnitRecords], explainer, simulators: dict, shuffled_control: bool = True, seed: int = 0) -> tuple[list[dict], dict]:
    """Per unit: its explanation and scores under every simulator (and, with `shuffled_control`, the
    scores of another unit's explanation); and the summary of means per simulator."""
    explanations = explainer.explain_many(records)
    order = derangement(len(records), seed)
    results = []
    for index, (record, explanation) in enumerate(zip(records, explanations)):
        result = {"kind": record.kind, "unit": record.unit, "explanation": explanation.text, "scores": {}}
        for name, simulator in simulators.items():
            result["scores"][name] = score_unit(simulator, explanation, record)
            if shuffled_control and len(records) > 1:
                result.setdefault("shuffled_scores", {})[name] = score_unit(simulator, explanations[order[index]], record)
        if shuffled_control and len(records) > 1:
            result["shuffled_explanation_of"] = records[order[index]].unit
        result["excerpts"] = {"top": [asdict(e) for e in record.top], "random": [asdict(e) for e in record.random]}
        results.append(result)
    return results, summarize(results, list(simulators))


def _means(scores: list[dict]) -> dict:
    count = len(scores)
    return {
        "mean_score_top_and_random": sum(s["top_and_random"] for s in scores) / count if count else None,
        "mean_score_random_only": sum(s["random_only"] for s in scores) / count if count else None,
        "units": count,
        "flagged_top_and_random": sum("top_and_random" in s["flags"] for s in scores),
        "flagged_random_only": sum("random_only" in s["flags"] for s in scores),
    }


def summarize(results: list[dict], simulator_names: list[str]) -> dict:
    """Means per simulator and kind ("latent", "neuron", ...) and for the shuffled control of each kind."""
    summary = {}
    for name in simulator_names:
        per_kind = {}
        for kind in dict.fromkeys(result["kind"] for result in results):
            of_kind = [result for result in results if result["kind"] == kind]
            per_kind[f"{kind}s"] = _means([result["scores"][name] for result in of_kind])
            shuffled = [result["shuffled_scores"][name] for result in of_kind if "shuffled_scores" in result]
            if shuffled:
                per_kind[f"{kind}s_shuffled"] = _means(shuffled)
        summary[name] = per_kind
    return summary


def write_jsonl(path: str | Path, results: list[dict]) -> Path:
    """One JSON object per unit (explanation, scores, excerpts), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(result) + "\n" for result in results)))
    return path


def explain_sae(sae: SparseAutoencoder, model: nn.Module, tokenizer, hookpoint: str, windows: Tensor, *, n_units: int,
                simulators, explainer_backend=None, latents: list[int] | None = None, neurons: bool = True,
                neuron_module: str | None = None, seed: int = 0, batch_windows: int = 32,
                jsonl_path: str | Path | None = None) -> dict:
    """The `explain` section of an eval report: latents, neurons and shuffled controls, every simulator.

    `simulators` is a choose.SimulatorSet; `explainer_backend` None uses the token-lookup explainer.
    """
    from .choose import make_explainer

    groups = [("latent", latent_records(model, tokenizer, sae, hookpoint, windows, n_units, latents, seed, batch_windows))]
    if neurons:
        groups.append(("neuron", neuron_records(model, tokenizer, hookpoint, windows, n_units, seed, neuron_module, batch_windows)))
    results, summary = [], {}
    for unit_name, records in groups:
        explainer = make_explainer(explainer_backend, unit_name)
        group_results, group_summary = explain_and_score(records, explainer, simulators.for_unit(unit_name), seed=seed)
        results += group_results
        for simulator, means in group_summary.items():
            summary.setdefault(simulator, {}).update(means)
    primary = next(name for name in ("llm", "embedding", "token-lookup") if name in summary)
    section = {
        "explainer": explainer.name,
        "primary_simulator": primary,
        "mean_score_top_and_random": summary[primary]["latents"]["mean_score_top_and_random"],
        "mean_score_random_only": summary[primary]["latents"]["mean_score_random_only"],
        "simulators": summary,
        "notes": list(simulators.notes),
    }
    if jsonl_path:
        section["records_file"] = str(write_jsonl(jsonl_path, results))
    return section


def explain_table(section: dict) -> str:
    """Mean scores per simulator: latents vs neurons vs shuffled controls."""
    lines = [f"explainer: {section['explainer']}", f"{'simulator':14} {'units':22} {'top+random':>10} {'random-only':>11} {'n':>4}"]
    for simulator, groups in section["simulators"].items():
        for group, means in groups.items():
            lines.append(f"{simulator:14} {group:22} {means['mean_score_top_and_random']:10.3f} "
                         f"{means['mean_score_random_only']:11.3f} {means['units']:4d}")
    return "\n".join(lines + [f"note: {note}" for note in section["notes"]])
