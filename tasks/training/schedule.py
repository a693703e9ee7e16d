"""Learning-rate schedules, stepped per batch: the rate of every step is a function of the
step alone, so a trial resumed from a checkpoint continues on the same curve with no scheduler
state to save.

- constant: the trial's rate throughout (after the warmup, if any);
- cosine: linear warmup, then cosine annealing to 0 at the last step (Loshchilov & Hutter 2017,
  SGDR without restarts);
- onecycle: the trial's rate is the PEAK; a cosine rise from peak/25 over the warmup (30% of the
  steps when no warmup is given), then a cosine fall to peak/25/1e4 (Smith & Topin 2018; torch's
  OneCycleLR defaults, fastai's fit_one_cycle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ONECYCLE_RISE = 0.3  # torch OneCycleLR's pct_start
ONECYCLE_DIV = 25.0  # initial rate = peak / div_factor
ONECYCLE_FINAL_DIV = 1e4  # final rate = initial / final_div_factor


@dataclass(frozen=True)
class Schedule:
    name: str
    peak: float
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, name: str, peak: float, warmup_epochs: float, epochs: int, steps_per_epoch: int) -> Schedule:
        total = epochs * steps_per_epoch
        warmup = min(total, round(warmup_epochs * steps_per_epoch))
        if name == "onecycle" and warmup == 0:
            warmup = round(ONECYCLE_RISE * total)
        return cls(name, peak, total, warmup)

    @property
    def varies(self) -> bool:
        """False for a constant rate without warmup: the optimizer's rate is never touched, so
        such a trial trains exactly as it did before schedules existed."""
        return self.name != "constant" or self.warmup_steps > 0

    def rate(self, step: int) -> float:
        """The learning rate of global step `step` (0-based)."""
        if self.name == "onecycle":
            initial = self.peak / ONECYCLE_DIV
            if step < self.warmup_steps:
                return _cosine(initial, self.peak, step / self.warmup_steps)
            fall = max(1, self.total_steps - self.warmup_steps)
            return _cosine(self.peak, initial / ONECYCLE_FINAL_DIV, (step - self.warmup_steps) / fall)
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.name == "cosine":
            rest = max(1, self.total_steps - self.warmup_steps)
            return _cosine(self.peak, 0.0, (step - self.warmup_steps) / rest)
        return self.peak


def _cosine(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 along half a cosine."""
    return end + (start - end) * (1 + math.cos(math.pi * min(1.0, progress))) / 2
