"""What every learning-rate schedule is: a rate for each global step (0-based), a function of the
step alone, so a trial resumed from a checkpoint continues on the same curve with no scheduler
state to save. The default is a linear warmup from 0 to the trial's rate, then the kind's own curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Schedule:
    peak: float  # the trial's learning rate
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int

    NAME: ClassVar[str] = ""
    # Whether a step's rate depends on how many steps follow it. A schedule that does not (constant,
    # step) gives the same curve for every --epochs, so a trial stopped at epoch E (a search's rung,
    # a kill) continues from its checkpoint to any later epoch exactly as an uninterrupted run;
    # one that does (cosine, onecycle) keeps the epoch count in its checkpoint's identity.
    DEPENDS_ON_LENGTH: ClassVar[bool] = True

    @classmethod
    def make(cls, training, peak: float, steps_per_epoch: int) -> Schedule:
        """The schedule of a trial of `training` (a TrainingConfig) at rate `peak`."""
        total = training.epochs * steps_per_epoch
        return cls(peak, total, min(total, round(training.warmup_epochs * steps_per_epoch)), steps_per_epoch)

    @property
    def varies(self) -> bool:
        """False only where the optimizer's rate is never touched (a constant rate, no warmup): such
        a trial trains exactly as it did before schedules existed."""
        return True

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError


def cosine(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 along half a cosine."""
    return end + (start - end) * (1 + math.cos(math.pi * min(1.0, progress))) / 2
