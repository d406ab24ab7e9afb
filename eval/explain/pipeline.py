"""Explain and score many units: SAE latents, the LM's MLP neurons at the same layer (the baseline a
reader compares against), and a shuffled-explanation control (each latent scored with another
latent's explanation: what a score looks like when the explanation is not about the unit).

Scoring methods: simulation (Bills et al. 2023, scoring.py), detection and fuzzing (Paulo et al. 2024,
detection.py), each under every scorer the simulators give (classifiers.scorers_for).

    records  = latent_records(model, tokenizer, sae, hookpoint, windows, n_units=50)
    results, summary = explain_and_score(records, TokenLookupExplainer(), {"embedding": EmbeddingSimulator()},
                                         scorers={"token-lookup": TokenLookupScorer()})
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import Tensor, nn

from sae.files import atomic_write
from sae.model import SparseAutoencoder

from ..missing import format_or_dash, mean_or_none
from .classifiers import N2GScorer, scorers_for
from .detection import METHODS, N_QUANTILES, add_classification_scores, parse_methods, summarize_classification
from .n2g import N2GExplainer, N2GSimulator, context_and_pad_ids
from .records import (NeuronSite, TokenStrings, UnitActivations, UnitRecords, find_mlp_neurons, neuron_activations,
                      no_neurons_note, sae_latent_activations)
from .scoring import score_unit
from .units import derangement, latent_records, neuron_records


def explain_and_score(records: list[UnitRecords], explainer, simulators: dict, shuffled_control: bool = True, seed: int = 0,
                      scorers: dict | None = None, methods: tuple[str, ...] = METHODS) -> tuple[list[dict], dict]:
    """Per unit: its explanation and scores under every simulator, and its detection and fuzzing
    metrics under every scorer (those of `methods`; and, with `shuffled_control`, the same of another
    unit's explanation); and the summary of means per simulator."""
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
        if record.quantile:
            result["excerpts"]["quantile"] = [asdict(e) for e in record.quantile]
        results.append(result)
    control = order if shuffled_control and len(records) > 1 else None
    add_classification_scores(results, records, explanations, scorers or {}, methods, control, seed)
    return results, summarize(results, list(simulators))


def _means(scores: list[dict]) -> dict:
    """Mean scores over units (None over no units) and how many of them were flagged."""
    return {
        "mean_score_top_and_random": mean_or_none(s["top_and_random"] for s in scores),
        "mean_score_random_only": mean_or_none(s["random_only"] for s in scores),
        "units": len(scores),
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


def add_n2g_scores(results: list[dict], records: list[UnitRecords], activations: UnitActivations, windows: Tensor,
                   tokenizer, seed: int = 0, batch_windows: int = 32, methods: tuple[str, ...] = METHODS) -> None:
    """The fourth offline explainer/simulator pair: each unit's N2G patterns (eval/explain/n2g.py) scored
    like the other explanations (correlation, top-and-random and random-only; detection and fuzzing; and
    the shuffled control with the same pairing as `explain_and_score`), those of `methods`, added to
    `results` (one per record, in order) under "n2g"; the patterns as `n2g_explanation`."""
    units = [record.unit for record in records]
    explainer = N2GExplainer(activations, units, windows, TokenStrings(tokenizer), *context_and_pad_ids(tokenizer),
                             token_budget=batch_windows * windows.shape[1])
    explanations = explainer.explain_many(records)
    order = derangement(len(records), seed)
    simulator = N2GSimulator()
    for index, (result, record) in enumerate(zip(results, records, strict=True)):
        result["n2g_explanation"] = explanations[index].text
        if "simulation" in methods:
            result["scores"]["n2g"] = score_unit(simulator, explanations[index], record)
            if "shuffled_explanation_of" in result:  # explain_and_score paired it with records[order[index]]
                result.setdefault("shuffled_scores", {})["n2g"] = score_unit(simulator, explanations[order[index]], record)
    control = order if any("shuffled_explanation_of" in result for result in results) else None
    add_classification_scores(results, records, explanations, {"n2g": N2GScorer()}, methods, control, seed)


def explain_sae(sae: SparseAutoencoder, model: nn.Module, tokenizer, hookpoint: str, windows: Tensor, *, n_units: int,
                simulators, explainer_backend=None, latents: list[int] | None = None, neurons: bool = True,
                neuron_site: NeuronSite | None = None, seed: int = 0, batch_windows: int = 32,
                jsonl_path: str | Path | None = None, methods: str = ",".join(METHODS)) -> dict:
    """The `explain` section of an eval report: latents, neurons and shuffled controls, every simulator,
    and every scorer of detection and fuzzing.

    `simulators` is a choose.SimulatorSet; `explainer_backend` None uses the token-lookup explainer. With
    "n2g" among the simulators, each unit also gets N2G patterns, scored by the N2G simulator and scorer.
    `methods` (comma-separated: simulation, detection, fuzzing; `--scorers`) are the scoring methods. With
    `neurons`, as many neurons of `neuron_site` (default: the MLP neurons of the hookpoint's block,
    `find_mlp_neurons`) as latents are the baseline; without such neurons, a note says it is skipped.
    """
    from .choose import make_explainer

    chosen_methods = parse_methods(methods)
    notes = list(simulators.notes)
    n_quantiles = N_QUANTILES if {"detection", "fuzzing"} & set(chosen_methods) else 0
    groups = [("latent", latent_records(model, tokenizer, sae, hookpoint, windows, n_units, latents, seed, batch_windows, n_quantiles))]
    site = (neuron_site or find_mlp_neurons(model, hookpoint)) if neurons else None
    if site is not None:
        groups.append(("neuron", neuron_records(model, tokenizer, site, windows, n_units, seed, batch_windows, n_quantiles)))
    elif neurons:
        notes.append(no_neurons_note(model, hookpoint))
    results, summary = [], {}
    for unit_name, records in groups:
        explainer = make_explainer(explainer_backend, unit_name)
        unit_simulators = simulators.for_unit(unit_name)
        group_simulators = unit_simulators if "simulation" in chosen_methods else {}
        group_results, group_summary = explain_and_score(records, explainer, group_simulators, seed=seed,
                                                         scorers=scorers_for(unit_simulators), methods=chosen_methods)
        if simulators.n2g:
            units = [record.unit for record in records]
            activations = (sae_latent_activations(model, hookpoint, sae, units) if unit_name == "latent" else
                           neuron_activations(model, site, units))
            add_n2g_scores(group_results, records, activations, windows, tokenizer, seed, batch_windows, chosen_methods)
            if "simulation" in chosen_methods:
                group_summary = summarize(group_results, [*group_simulators, "n2g"])
        results += group_results
        for simulator, means in group_summary.items():
            summary.setdefault(simulator, {}).update(means)
    primary = next((name for name in PRIMARY_ORDER if name in summary), None)
    # no latent to explain (no live one on `windows`), or no simulation asked for: no mean
    latents = (summary[primary].get("latents") if primary else None) or _means([])
    section = {
        "explainer": explainer.name + ("; n2g: its own patterns" if simulators.n2g else ""),
        "primary_simulator": primary,
        "mean_score_top_and_random": latents["mean_score_top_and_random"],
        "mean_score_random_only": latents["mean_score_random_only"],
        "simulators": summary,
        "neuron_site": None if site is None else str(site),
        "notes": notes,
    }
    for method in ("detection", "fuzzing"):
        if method in chosen_methods:
            section.update(classification_section(results, method))
    if jsonl_path:
        section["records_file"] = str(write_jsonl(jsonl_path, results))
    return section


PRIMARY_ORDER = ("llm", "embedding", "token-lookup", "n2g")
"""The simulator (and scorer) whose latent means head the section: the first of these that ran."""


def classification_section(results: list[dict], method: str) -> dict:
    """The section's entries for detection or fuzzing: means per scorer and group (`method`), and the
    latents' mean AUC under the primary scorer (`mean_{method}_auc`, None without latents) and its name."""
    groups = summarize_classification(results, method)
    primary = next((name for name in PRIMARY_ORDER if name in groups), None)
    latents = groups[primary].get("latents", {}) if primary else {}
    return {method: groups, f"primary_{method}_scorer": primary, f"mean_{method}_auc": latents.get("mean_auc")}


def explain_table(section: dict) -> str:
    """Mean scores per simulator: latents vs neurons vs shuffled controls."""
    lines = [f"explainer: {section['explainer']}", f"{'simulator':14} {'units':22} {'top+random':>10} {'random-only':>11} {'n':>4}"]
    for simulator, groups in section["simulators"].items():
        for group, means in groups.items():
            lines.append(f"{simulator:14} {group:22} {format_or_dash(means['mean_score_top_and_random'], '.3f'):>10} "
                         f"{format_or_dash(means['mean_score_random_only'], '.3f'):>11} {means['units']:4d}")
    return "\n".join(lines + classification_table(section) + [f"note: {note}" for note in section["notes"]])


def classification_table(section: dict) -> list[str]:
    """Lines of mean balanced accuracy, F1 and AUC (± 1.96 SE over units) per method, scorer and group."""
    lines = []
    for method in ("detection", "fuzzing"):
        if section.get(method):
            lines.append(f"{method:14} {'units':22} {'bal. acc.':>13} {'F1':>13} {'AUC':>13} {'n':>4}")
        for scorer, groups in section.get(method, {}).items():
            for group, means in groups.items():
                cells = [f"{format_or_dash(means[f'mean_{m}'], '.3f')}±{format_or_dash(means[f'ci95_{m}'], '.3f')}"
                         for m in ("balanced_accuracy", "f1", "auc")]
                lines.append(f"{scorer:14} {group:22} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {means['units']:4d}")
    return lines
