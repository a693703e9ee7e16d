"""constant: the trial's rate throughout (after the warmup, if any)."""

from __future__ import annotations

from tasks.training.schedules.base import Schedule


class Constant(Schedule):
    NAME = "constant"
    DEPENDS_ON_LENGTH = False

    @property
    def varies(self) -> bool:
        return self.warmup_steps > 0

    def after_warmup(self, step: int) -> float:
        return self.peak
