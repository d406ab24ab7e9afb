"""Warnings that an lr is too high for a shape: late divergence (the training fvu rising for a sustained
stretch after it had fallen), and latents dying in numbers.

An lr too high for a shape can train well for a while and then drift up (issue 34: the schedule-free lr
rule was measured only up to 8,192 latents). Nothing stops the run; one line on stderr says so, naming
the lr, while there is still time to stop it. The logged fvu is noisy from batch to batch, so the watch
follows its exponential moving average and warns when that average has stayed more than `RISE` above
its lowest value for `PATIENCE` logged steps in a row. It starts afresh on a resumed run.

Past the measured shapes the rule's lr also killed latents while the fvu kept falling on average (an
eighth to a third of them within a few dozen steps; docs/peers.md, "Past 8,192 latents"), which the fvu
watch does not see: `DeadLatentWatch` warns once when the dead fraction first exceeds `DEAD_FRACTION`.
"""

from __future__ import annotations

from dataclasses import dataclass

SMOOTHING = 0.9
"""Decay of the moving average per logged step."""
RISE = 0.05
"""How far above its lowest value (relative) the average must be to count as rising."""
PATIENCE = 20
"""Logged steps in a row that the average must stay risen for the warning."""
DEAD_FRACTION = 0.10
"""The dead fraction (training's `dead_frac`) above which `DeadLatentWatch` warns."""


@dataclass
class DivergenceWatch:
    """Follows one SAE's logged training fvu; `update` says when to warn (once)."""

    average: float | None = None
    lowest: float | None = None
    risen_for: int = 0
    warned: bool = False

    def update(self, fvu: float) -> bool:
        """Take the next logged fvu; True the first time the average has stayed risen for PATIENCE steps."""
        self.average = fvu if self.average is None else SMOOTHING * self.average + (1 - SMOOTHING) * fvu
        self.lowest = self.average if self.lowest is None else min(self.lowest, self.average)
        self.risen_for = self.risen_for + 1 if self.average > (1 + RISE) * self.lowest else 0
        if self.risen_for >= PATIENCE and not self.warned:
            self.warned = True
            return True
        return False

    def message(self, what: str, lr: float, step: int) -> str:
        """The warning's one line, for the SAE `what` trained at `lr`, at `step`."""
        return (f"warning: {what}'s training fvu has risen for {self.risen_for} logged steps, to a moving average of "
                f"{self.average:.4f} from its lowest {self.lowest:.4f} (step {step}): lr {lr:g} may be too high for "
                f"this shape; consider a lower --lr")


@dataclass
class DeadLatentWatch:
    """Follows one SAE's logged dead fraction; `update` says when to warn (once)."""

    warned: bool = False

    def update(self, dead_frac: float) -> bool:
        """Take the next logged dead fraction; True the first time it exceeds DEAD_FRACTION."""
        if dead_frac > DEAD_FRACTION and not self.warned:
            self.warned = True
            return True
        return False

    @staticmethod
    def message(what: str, dead_frac: float, lr: float, step: int) -> str:
        """The warning's one line, for the SAE `what` trained at `lr`, at `step`."""
        return (f"warning: {dead_frac:.1%} of {what}'s latents are dead at step {step} (no firing for dead_tokens "
                f"training tokens): lr {lr:g} may be too high for this shape; consider a lower --lr")
