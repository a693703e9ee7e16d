"""step: the rate multiplied by `lr_step_factor` every `lr_step_epochs` epochs (torch's StepLR,
stepped per batch at epoch boundaries), after the warmup, if any, counted from the first step."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from models.config_group import ConfigGroup
from tasks.training.schedules.base import Schedule


class StepFields(ConfigGroup):
    """The step schedule's own fields, part of the training group."""

    lr_step_epochs: int = Field(
        title="step schedule: epochs per step", default=2, ge=1, le=1000,
        description="lr_schedule 'step': multiply the rate by lr_step_factor every this many epochs (1-1000).")
    lr_step_factor: float = Field(
        title="step schedule: factor", default=0.1, gt=0, lt=1,
        description="lr_schedule 'step': the factor the rate is multiplied by at each step (0-1, exclusive; "
        "StepLR's gamma).")


@dataclass(frozen=True)
class Step(Schedule):
    every_steps: int = 1
    factor: float = 0.1

    NAME = "step"
    DEPENDS_ON_LENGTH = False

    @classmethod
    def make(cls, training, peak: float, steps_per_epoch: int) -> Step:
        base = Schedule.make(training, peak, steps_per_epoch)
        return cls(peak, base.total_steps, base.warmup_steps, steps_per_epoch,
                   every_steps=training.lr_step_epochs * steps_per_epoch, factor=training.lr_step_factor)

    def after_warmup(self, step: int) -> float:
        return self.peak * self.factor ** (step // self.every_steps)
