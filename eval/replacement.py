"""The replacement model (`python -m eval TRANSCODER_DIR ... --replace_all`): a set of transcoders, each in
place of its module's output, all in one forward.

Every transcoder replaces its module's output (positions >= 1, as every splice of the eval) by its
prediction from that module's input, in the same forward pass: a later layer's transcoder reads what the
earlier replacements made of the residual stream, so their errors compound as they do in the "replacement
model" that circuit tracing builds from per-layer transcoders (Dunefsky et al. 2024; Ameisen et al. 2025).
Per batch of windows the LM runs twice: clean, and with every replacement in. The report:

    ce_clean, ce_replaced   next-token cross-entropy of the clean LM and of the replacement model
    delta_ce                ce_replaced - ce_clean
    kl                      mean KL(p_clean || p_replaced) over the predictions at positions >= 1
    layers                  per transcoder, in the order the LM runs their modules: fvu, nmse, l0 and
                            never_fired_frac inside the replacement model (its prediction from the input
                            its module gets there, against the output its module computes from that
                            input), and fvu_alone: the same on the clean LM, what `python -m eval FOLDER`
                            reports for it alone

The fvu's centre is the module output's mean on the clean LM over the same tokens, as for one transcoder
(eval/evaluate.py).

    from eval.replacement import replacement_model
    report = replacement_model({"h0": (tc0, "transformer.h.0.mlp"), ...}, model, tokens)
    report["delta_ce"], report["kl"], report["layers"][0]["fvu"]
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae.activations import get_module, hookpoint_widths, module_input, output_hidden, with_hidden
from sae.config import input_site
from sae.errors import UsageError
from sae.model import SparseAutoencoder

from .downstream import LossStats
from .evaluate import activation_means
from .reconstruction import ReconstructionStats
from .report import kind_keys

Members = Mapping[str, tuple[SparseAutoencoder, str]]
"""{name (e.g. its folder): (transcoder, the module whose output it replaces)}."""


def check_replacement_set(members: Members) -> None:
    """One line (UsageError) when `members` cannot make one replacement model: a member that is not a
    transcoder, or two that replace the same module."""
    for name, (sae, _) in members.items():
        if not sae.cfg.transcode:
            raise UsageError(f"{name} is not a transcoder (its cfg.json has no \"transcode\": true): the replacement "
                             f"model puts each transcoder's prediction in place of its module's output")
    by_module: dict[str, str] = {}
    for name, (_, hookpoint) in members.items():
        if hookpoint in by_module:
            raise UsageError(f"{by_module[hookpoint]} and {name} both replace {hookpoint}: the replacement model "
                             "takes one transcoder per module")
        by_module[hookpoint] = name


class _TranscoderHook:
    """Forward hook (with kwargs) on one transcoder's module: its prediction of the output at positions
    >= start from the module's input, scored against the output the module computed; while `replacing`,
    the prediction takes that output's place."""

    def __init__(self, sae: SparseAutoencoder, mean: Tensor, start: int):
        self.sae = sae
        self.start = start
        self.replacing = False
        self.stats = {replacing: ReconstructionStats(sae.cfg.n_latents, mean) for replacing in (False, True)}

    def __call__(self, _module, args, kwargs, output):
        hidden = output_hidden(output)
        target = hidden[:, self.start :]
        x = module_input(args, kwargs)[:, self.start :].flatten(0, 1).to(self.sae.dtype)
        prediction, values, indices = self.sae.reconstruct(x)
        self.stats[self.replacing].update(target.flatten(0, 1), prediction, values, indices)
        if not self.replacing:
            return None
        return with_hidden(output, torch.cat([hidden[:, : self.start], prediction.view_as(target).to(hidden.dtype)], 1))


@contextmanager
def _hooked(modules: list[nn.Module], hooks: list[_TranscoderHook]):
    """Each hook on its module while the block runs."""
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module, hook in zip(modules, hooks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_widths(model: nn.Module, members: Members) -> None:
    """Each transcoder's d_in is its module's input and output width; one line naming the first that is not."""
    hookpoints = [hookpoint for _, hookpoint in members.values()]
    widths = hookpoint_widths(model, [site for hookpoint in hookpoints for site in (input_site(hookpoint), hookpoint)])
    for name, (sae, hookpoint) in members.items():
        d_in, d_out = widths[input_site(hookpoint)], widths[hookpoint]
        if sae.cfg.d_in != d_in or sae.cfg.d_in != d_out:
            raise UsageError(f"transcoder '{name}' takes and predicts d_in={sae.cfg.d_in} features, but {hookpoint} "
                             f"reads {d_in} and outputs {d_out}")


@torch.no_grad()
def replacement_model(members: Members, model: nn.Module, tokens: Tensor, batch_windows: int = 16,
                      progress: bool = False) -> dict:
    """The replacement model's report (module docstring) on `tokens` (n_windows, ctx_len): every member's
    prediction in place of its module's output, in one forward."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (n_windows, ctx_len), got shape {tuple(tokens.shape)}")
    if not members:
        raise ValueError("no transcoders to splice")
    check_replacement_set(members)
    _check_widths(model, members)
    order = {name: position for position, (name, _) in enumerate(model.named_modules())}
    names = sorted(members, key=lambda name: order[members[name][1]])  # the order the LM runs them
    hookpoints = [members[name][1] for name in names]
    modules = [get_module(model, hookpoint) for hookpoint in hookpoints]
    device = next(model.parameters()).device
    means = activation_means(model, hookpoints, tokens, batch_windows)
    hooks = [_TranscoderHook(members[name][0].to(device).eval(), mean, start=1) for name, mean in zip(names, means)]
    losses = LossStats(2, start=1)
    with _hooked(modules, hooks):
        for first in tqdm(range(0, len(tokens), batch_windows), desc="replacement model", unit="batch",
                          disable=not progress):
            input_ids = tokens[first : first + batch_windows].to(device)
            logits = []
            for replacing in (False, True):
                for hook in hooks:
                    hook.replacing = replacing
                logits.append(model(input_ids=input_ids).logits)
            losses.update(torch.stack(logits), input_ids)
    (ce_clean, ce_replaced), (_, kl) = losses.mean_ce(), losses.mean_kl()
    return {
        "ce_clean": ce_clean, "ce_replaced": ce_replaced, "delta_ce": ce_replaced - ce_clean, "kl": kl,
        "ce_positions": losses.positions, "tokens": hooks[0].stats[True].tokens,
        "layers": [_layer(name, hookpoint, hook) for name, hookpoint, hook in zip(names, hookpoints, hooks)],
    }


def _layer(name: str, hookpoint: str, hook: _TranscoderHook) -> dict:
    inside, alone = (hook.stats[replacing].summary() for replacing in (True, False))
    return {"sae": name, **kind_keys(hook.sae.cfg), "hookpoint": hookpoint, "fvu": inside["fvu"], "nmse": inside["nmse"],
            "l0": inside["l0"], "never_fired_frac": inside["never_fired_frac"], "fvu_alone": alone["fvu"]}
