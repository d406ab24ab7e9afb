"""Where an SAE reads its activations, in SAELens's terms: our hookpoint (a Hugging Face module's output)
as a TransformerLens hook name where one is known to hold the same activations, else as SAELens's
Hugging Face path (model_class_name "AutoModelForCausalLM", whose HookedProxyLM hooks modules by their
names and takes the first tensor of a tuple output, as our hooks do).

TransformerLens (`HookedTransformer`, components/transformer_block.py) names per block L: hook_resid_post
(the residual stream after the block: a Hugging Face block's output, in every family), hook_attn_out and
hook_mlp_out (what the attention and the MLP add to the residual stream). The last two equal the Hugging
Face `self_attn` / `mlp` module outputs only in families without a norm after the sublayer (Gemma 2 and 3
and OLMo 2 norm it before adding: their hook_mlp_out is post_feedforward_layernorm's output) and whose MLP
does not add the residual itself (Bloom's does), so those need the LM's family (its config's model_type).

Equal activations need an unprocessed residual stream: HookedTransformer.from_pretrained centres the
weights that write to it by default, which shifts every activation. SAELens records the setting it trains
with, {"center_writing_weights": False} (sae_lens/config.py), in model_from_pretrained_kwargs; the export
records the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_EVERY_FAMILY = None
_GPT2_LIKE = frozenset({"gpt2", "gptj", "gpt_neo"})  # the families whose blocks are `transformer.h.L` with `.attn`
_PRE_NORM = frozenset({"llama", "mistral", "qwen2", "gemma", "phi", "phi3"})
"""`model.layers.L` families whose self_attn and mlp outputs are what the block adds to the residual stream."""

TRANSFORMER_LENS_HOOKS: tuple[tuple[re.Pattern[str], frozenset[str] | None, str], ...] = (
    # (our hookpoint, with the layer as group 1; the LM families (model_type) where it holds the hook's
    #  activations, None: all; the TransformerLens hook)
    (re.compile(r"(?:transformer\.h|gpt_neox\.layers|model\.layers)\.(\d+)"), _EVERY_FAMILY, "blocks.{}.hook_resid_post"),
    (re.compile(r"transformer\.h\.(\d+)\.attn"), _GPT2_LIKE, "blocks.{}.hook_attn_out"),
    (re.compile(r"transformer\.h\.(\d+)\.mlp"), _GPT2_LIKE, "blocks.{}.hook_mlp_out"),
    (re.compile(r"gpt_neox\.layers\.(\d+)\.attention"), frozenset({"gpt_neox"}), "blocks.{}.hook_attn_out"),
    (re.compile(r"gpt_neox\.layers\.(\d+)\.mlp"), frozenset({"gpt_neox"}), "blocks.{}.hook_mlp_out"),
    (re.compile(r"model\.layers\.(\d+)\.self_attn"), _PRE_NORM, "blocks.{}.hook_attn_out"),
    (re.compile(r"model\.layers\.(\d+)\.mlp"), _PRE_NORM, "blocks.{}.hook_mlp_out"),
)

TRANSFORMER_LENS_KWARGS = {"center_writing_weights": False}
"""HookedTransformer.from_pretrained options under which its hooks hold the Hugging Face activations."""


def transformer_lens_hook(hookpoint: str, model_type: str | None) -> str | None:
    """The TransformerLens hook holding the activations of `hookpoint` in an LM of family `model_type` (None:
    not known, which only block outputs do without), or None if no hook is known to."""
    for pattern, families, hook in TRANSFORMER_LENS_HOOKS:
        match = pattern.fullmatch(hookpoint)
        if match and (families is _EVERY_FAMILY or model_type in families):
            return hook.format(match.group(1))
    return None


def lm_family(model: str | None) -> str | None:
    """The model_type of the LM `model` (a local folder, or a hub name already in the local cache; nothing is
    downloaded), or None where its config is not here."""
    if not model:
        return None
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except ValueError:  # not a hub name (huggingface_hub's HFValidationError)
            return None
        if not isinstance(cached, str):
            return None
        config_path = Path(cached)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):  # an unreadable config says nothing of the family; the LM's loading will say more
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def saelens_hook(provenance: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(SAELens metadata keys saying where the SAE reads, a note for the user or None) from our provenance's
    hookpoint and model: hook_name a TransformerLens hook with model_class_name "HookedTransformer" and
    TRANSFORMER_LENS_KWARGS where one is known, else our hookpoint with "AutoModelForCausalLM" and a note
    that it is no TransformerLens name; nothing, and a note, without a hookpoint."""
    hookpoint = provenance.get("hookpoint")
    if not hookpoint:
        return {}, "no hookpoint recorded, so SAELens's hook_name is left unset (pass --hookpoint to record one)"
    family = lm_family(provenance.get("model"))
    hook = transformer_lens_hook(hookpoint, family)
    if hook is not None:
        return {"hook_name": hook, "model_class_name": "HookedTransformer",
                "model_from_pretrained_kwargs": dict(TRANSFORMER_LENS_KWARGS)}, None
    known = f"for model_type {family!r}" if family else "(the LM's config.json is not here to tell its family)"
    return ({"hook_name": hookpoint, "model_class_name": "AutoModelForCausalLM"},
            f"SAELens hook_name '{hookpoint}' is our hookpoint, a Hugging Face module name: no TransformerLens hook "
            f"is known to hold its activations {known}; SAELens reads it with model_class_name AutoModelForCausalLM")
