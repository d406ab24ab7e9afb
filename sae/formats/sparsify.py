"""sparsify's cfg.json (EleutherAI's sparsify, `SparseCoderConfig` in sparsify/config.py): which of its keys
and values this SAE computes exactly, and how it reads the number of latents. Our folder layout is sparsify's,
so sae/model.py `read_sae_config` applies these to every cfg.json it reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError

ANY_VALUE = None
"""In `SPARSIFY_KEY_RULES`: every value of the key loads exactly."""

SPARSIFY_KEY_RULES: dict[str, tuple[tuple[Any, ...] | None, str]] = {
    # key:              (values this SAE computes exactly, what the key means in sparsify)
    "d_in":              (ANY_VALUE, "read: the input width"),
    "num_latents":       (ANY_VALUE, "read: the number of latents; 0 means d_in * expansion_factor"),
    "expansion_factor":  (ANY_VALUE, "read when num_latents is 0 (or absent)"),
    "k":                 (ANY_VALUE, "read: latents kept per token"),
    "multi_topk":        (ANY_VALUE, "a training loss; encode and decode do not depend on it"),
    "normalize_decoder": (ANY_VALUE, "a training constraint; encode and decode use W_dec as stored"),
    "activation":        (("topk", "batchtopk"), "'groupmax' keeps the largest latent of each of k equal "
                                     "groups, not the k largest overall ('batchtopk' is ours: sparsify has none)"),
    "transcode":         (ANY_VALUE, "read: a transcoder (encodes x without subtracting b_dec, predicts the "
                                    "module's output)"),
    "skip_connection":   (ANY_VALUE, "read: a skip transcoder (adds x @ W_skip.T, a W_skip tensor)"),
    "embed_skip":        ((False,), "it adds an affine map of the model's embeddings (W_embed_skip, "
                                    "b_embed_skip) to the reconstruction"),
    "gram_lookup":       ((False,), "it subtracts a frozen n-gram mean table, which is not in the folder, "
                                    "from the input and the target"),
    "lookup_max_order":  (ANY_VALUE, "used only with gram_lookup"),
    "gram_table_hash":   (ANY_VALUE, "provenance of gram_lookup's table"),
    "d_embed":           (ANY_VALUE, "used only with embed_skip"),
}
"""Every cfg.json key sparsify writes (`SparseCoderConfig` in sparsify/config.py, plus `d_in` and
`d_embed` from `SparseCoder.save_to_disk`), and the values whose math this SAE implements. A key absent
from the file takes sparsify's default, which is always one of the allowed values. Loading any other
value would silently compute something else than sparsify does, so `read_sae_config` refuses it.

One difference that needs no rule: sparsify applies ReLU before its top-k (sparsify/fused_encoder.py),
this SAE after. The codes (values scattered into n_latents) and the reconstruction are the same; only
the indices of zero-valued picks, in rows with fewer than k positive pre-activations, may differ."""


def check_sparsify_keys(raw: dict[str, Any], cfg_path: Path) -> None:
    """Raise ValueError naming the first key of `raw` whose value `SPARSIFY_KEY_RULES` does not allow."""
    for key, (allowed, meaning) in SPARSIFY_KEY_RULES.items():
        if key not in raw or allowed is ANY_VALUE:
            continue
        value = raw[key]
        # Compare types too: JSON 1 or 0 must not pass for true or false.
        if not any(type(value) is type(option) and value == option for option in allowed):
            allowed_text = " or ".join(json.dumps(option) for option in allowed)
            raise UsageError(
                f"{cfg_path}: cannot load '{key}': {json.dumps(value)} (only {allowed_text} is supported): "
                f"in sparsify {meaning}, so this SAE would not compute what sparsify computes"
            )


def _is_json_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_num_latents(raw: dict[str, Any], cfg_path: Path) -> Any:
    """The number of latents a cfg.json means, by sparsify's rule (sparsify/sparse_coder.py,
    `SparseCoder.__init__`: `num_latents = cfg.num_latents or d_in * cfg.expansion_factor`).

    A `num_latents` other than 0 is returned as is (its type is checked with the other SaeConfig fields).
    0 or absent needs `expansion_factor` in the file: sparsify would fall back to its default (32),
    but a file that names neither is more likely broken than meant that way, and we do not guess.
    """
    num_latents = raw.get("num_latents", 0)
    if not (_is_json_int(num_latents) and num_latents == 0):
        return num_latents
    if "expansion_factor" not in raw:
        raise UsageError(f"{cfg_path}: missing key 'num_latents' (or 'num_latents': 0 with 'expansion_factor')")
    d_in, expansion_factor = raw["d_in"], raw["expansion_factor"]
    if not (_is_json_int(expansion_factor) and expansion_factor > 0):
        raise UsageError(f"{cfg_path}: 'expansion_factor' must be a positive integer when 'num_latents' is 0, "
                         f"got {json.dumps(expansion_factor)}")
    if not (_is_json_int(d_in) and d_in > 0):
        raise UsageError(f"{cfg_path}: 'd_in' must be a positive integer, got {json.dumps(d_in)}")
    return d_in * expansion_factor
