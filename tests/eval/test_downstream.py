"""Cross-entropy and KL sums against a float64 reference; the recovered-loss formula."""

import math

import torch

from eval.downstream import LossStats, recovered


def reference(logits, input_ids, start):
    """Per variant: mean CE of predictions at positions start..T-2, and mean KL(clean || variant), float64."""
    log_probs = logits.double()[:, :, start:-1].log_softmax(-1)
    targets = input_ids[:, start + 1 :]
    ce = -log_probs.gather(-1, targets[None, ..., None].expand(len(logits), -1, -1, 1)).squeeze(-1)
    kl = (log_probs[0].exp() * (log_probs[0] - log_probs)).sum(-1)
    return ce.mean((1, 2)), kl.mean((1, 2))


def test_loss_stats_match_float64_reference_over_uneven_batches():
    torch.manual_seed(0)
    stats = LossStats(n_variants=3, start=1)
    all_logits, all_ids = [], []
    for batch in (4, 1, 3):
        logits = torch.randn(3, batch, 9, 37) * 3
        input_ids = torch.randint(0, 37, (batch, 9))
        stats.update(logits, input_ids)
        all_logits.append(logits)
        all_ids.append(input_ids)
    ce, kl = reference(torch.cat(all_logits, 1), torch.cat(all_ids), start=1)
    assert stats.positions == 8 * 7
    torch.testing.assert_close(torch.tensor(stats.mean_ce(), dtype=torch.float64), ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(stats.mean_kl(), dtype=torch.float64), kl, rtol=1e-5, atol=1e-6)
    assert stats.mean_kl()[0] == 0


def test_recovered():
    assert recovered(ce_ablated=10.0, ce_spliced=4.0, ce_clean=4.0) == 1
    assert recovered(ce_ablated=10.0, ce_spliced=10.0, ce_clean=4.0) == 0
    assert recovered(ce_ablated=10.0, ce_spliced=7.0, ce_clean=4.0) == 0.5
    assert math.isnan(recovered(ce_ablated=4.0, ce_spliced=4.0, ce_clean=4.0))
