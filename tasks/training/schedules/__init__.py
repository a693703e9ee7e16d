"""Learning-rate schedules, stepped per batch, one module per kind behind `base.Schedule`.

A new schedule is one module here (a `Schedule` subclass with its NAME, DEPENDS_ON_LENGTH and
rate; its own fields, if any, as a ConfigGroup) and its registration: a line in SCHEDULES below
and, for fields, a base of TrainingConfig (tasks/training/config.py).
"""

from __future__ import annotations

from tasks.training.schedules.base import Schedule
from tasks.training.schedules.constant import Constant
from tasks.training.schedules.cosine import Cosine
from tasks.training.schedules.onecycle import OneCycle
from tasks.training.schedules.step import Step

SCHEDULES: dict[str, type[Schedule]] = {kind.NAME: kind for kind in (Constant, Cosine, OneCycle, Step)}


def schedule_of(training, peak: float, steps_per_epoch: int) -> Schedule:
    """The schedule of one trial: its training group's kind at the trial's rate."""
    return SCHEDULES[training.lr_schedule].make(training, peak, steps_per_epoch)
