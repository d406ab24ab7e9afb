"""Token hygiene: which activation rows training and eval use.

Two rules, both recorded in cfg.json (`DataConfig.exclude_special_tokens`, `DataConfig.outlier_norm_ratio`):

- special tokens: the rows of the tokenizer's BOS, EOS and pad tokens are dropped (on by default). The
  document separator the stream inserts is EOS, so this drops it too. In many LMs these tokens are
  attention sinks with norms far above the text's (not in the embedded model: docs/token-hygiene.md),
  and SAELens (`exclude_special_tokens`) and sparsify (`exclude_tokens`) can leave them out too.
- outlier norms (off by default, 0): a row whose norm, at any of the stream's hookpoints, exceeds
  `ratio` x the median norm of that hookpoint's rows is dropped. The median is over the rows left by the
  first rule: in training those of one shuffle block (a fixed set of windows, so a resumed run drops the
  same rows), in an eval those of all its windows.

The first position of every window is dropped before either rule, as it always was (sae/activations.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def special_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the tokenizer's BOS, EOS and pad tokens (the ones that exist), sorted, without repeats."""
    ids = {getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return sorted(int(token) for token in ids if token is not None)


def excluded_ids(tokenizer: Any, exclude_special_tokens: bool) -> list[int]:
    """The token ids whose rows a run with `exclude_special_tokens` drops: `special_token_ids`, or none."""
    return special_token_ids(tokenizer) if exclude_special_tokens else []


def token_keep_mask(token_ids: Tensor, excluded: Sequence[int]) -> Tensor:
    """Bool mask, the shape of `token_ids`: True where the token is not one of `excluded`."""
    if not excluded:
        return torch.ones_like(token_ids, dtype=torch.bool)
    return ~torch.isin(token_ids, torch.tensor(list(excluded), dtype=token_ids.dtype, device=token_ids.device))


def norm_keep_mask(activations: Sequence[Tensor], keep: Tensor, ratio: float,
                   medians: Sequence[Tensor] | None = None) -> Tensor:
    """`keep` (N,) narrowed to the rows whose norm is at most `ratio` x the median norm at every hookpoint.

    activations: per hookpoint, (N, d) rows. `medians` (per hookpoint, 0-dim): given by an eval, which
    takes them over all its text (`median_norms`); None: the median of the kept rows of these activations.
    ratio 0 keeps `keep` as it is."""
    if ratio <= 0:
        return keep
    if medians is None:
        medians = median_norms(activations, keep)
    for rows, median in zip(activations, medians):
        keep = keep & (rows.float().norm(dim=-1) <= ratio * median.to(rows.device))
    return keep


def median_norms(activations: Sequence[Tensor], keep: Tensor) -> list[Tensor]:
    """Per hookpoint, the median norm of the rows of `activations` that `keep` (N,) marks, 0-dim float32
    (the lower median of an even count, torch's); 0 when no row is kept."""
    medians = []
    for rows in activations:
        norms = rows[keep].float().norm(dim=-1)
        medians.append(norms.median() if norms.numel() else torch.zeros((), device=rows.device))
    return medians
