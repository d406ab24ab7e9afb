"""The warnings of sae/divergence.py: late divergence fires once on a sustained rise of the logged fvu, never
on a noisy plateau; the dead-latent one once when the dead fraction passes DEAD_FRACTION; the trainer prints
each in one line naming the SAE and the lr."""

import random

from sae.divergence import DEAD_FRACTION, PATIENCE, DeadLatentWatch, DivergenceWatch


class PrintingProgress:
    """A tqdm stand-in for write_log_line: its lines go where they were sent."""

    def write(self, text, file):
        print(text, file=file)

    def set_postfix(self, **_):
        pass


def warned_at(values) -> list[int]:
    watch = DivergenceWatch()
    return [i for i, value in enumerate(values) if watch.update(value)]


def test_a_sustained_rise_after_a_fall_warns_once():
    falling = [1.0 * 0.97**i for i in range(100)]  # down to about 0.048
    rising = [falling[-1] * 1.02**i for i in range(1, 200)]
    warnings = warned_at(falling + rising)
    assert len(warnings) == 1
    assert len(falling) + PATIENCE <= warnings[0] < len(falling) + 40  # soon after the average clears 5%


def test_noise_on_a_plateau_and_a_short_bump_do_not_warn():
    rng = random.Random(0)
    plateau = [0.2 * (1 + rng.uniform(-0.1, 0.1)) for _ in range(500)]
    bump = [0.2] * 100 + [0.3] * (PATIENCE // 4) + [0.2] * 100  # a few bad batches
    assert warned_at(plateau) == [] and warned_at(bump) == []


def test_the_trainer_prints_it_once_in_one_line(capsys):
    from types import SimpleNamespace

    from sae.trainer import write_log_line

    member = SimpleNamespace(name="k16", hookpoint="transformer.h.2", metrics={}, divergence=DivergenceWatch(),
                             dead_watch=DeadLatentWatch())
    run = SimpleNamespace(log=SimpleNamespace(write=lambda line: None), members=[member])
    for step, fvu in enumerate([0.5 * 0.95**i for i in range(60)] + [0.5] * 60, start=1):
        member.metrics = {"fvu": fvu, "lr": 0.032, "l0": 16.0, "dead_frac": 0.0}
        write_log_line(run, {"step": step, "tokens_per_s": 1.0}, PrintingProgress())
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "k16" in lines[0] and "lr 0.032" in lines[0] and lines[0].startswith("warning:")


def test_latents_dying_in_numbers_warn_once_in_one_line(capsys):
    from types import SimpleNamespace

    from sae.trainer import write_log_line

    watch = DeadLatentWatch()
    assert [watch.update(dead) for dead in (0.0, DEAD_FRACTION, 0.125, 0.3, 0.05, 0.5)] == [
        False, False, True, False, False, False]
    member = SimpleNamespace(name="", hookpoint="transformer.h.2", metrics={}, divergence=DivergenceWatch(),
                             dead_watch=DeadLatentWatch())
    run = SimpleNamespace(log=SimpleNamespace(write=lambda line: None), members=[member])
    for step, dead in enumerate([0.0] * 30 + [0.02, 0.08, 0.125, 0.34], start=1):
        member.metrics = {"fvu": 0.1, "lr": 0.019, "l0": 32.0, "dead_frac": dead}
        write_log_line(run, {"step": step, "tokens_per_s": 1.0}, PrintingProgress())
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: 12.5% of transformer.h.2's latents are dead at step 33") and "lr 0.019" in line
