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


def depends_on_length(training) -> bool:
    """Whether a trial's rates depend on its number of epochs: the kind's own curve does
    (DEPENDS_ON_LENGTH), or a warmup longer than the trial, which Schedule.make cuts to its length
    (a search's rung shorter than the warmup). Otherwise every --epochs gives the same curve."""
    return SCHEDULES[training.lr_schedule].DEPENDS_ON_LENGTH or training.warmup_epochs > training.epochs


def schedule_of(training, peak: float, steps_per_epoch: int) -> Schedule:
    """The schedule of one trial: its training group's kind at the trial's rate."""
    return SCHEDULES[training.lr_schedule].make(training, peak, steps_per_epoch)
