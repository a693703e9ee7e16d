"""onecycle: the trial's rate is the PEAK; a cosine rise from peak/25 over the warmup (30% of the
steps when no warmup is given), then a cosine fall to peak/25/1e4 (Smith & Topin 2018; torch's
OneCycleLR defaults, fastai's fit_one_cycle)."""

from __future__ import annotations

from tasks.training.schedules.base import Schedule, cosine

ONECYCLE_RISE = 0.3  # torch OneCycleLR's pct_start
ONECYCLE_DIV = 25.0  # initial rate = peak / div_factor
ONECYCLE_FINAL_DIV = 1e4  # final rate = initial / final_div_factor


class OneCycle(Schedule):
    NAME = "onecycle"

    @classmethod
    def make(cls, training, peak: float, steps_per_epoch: int) -> OneCycle:
        schedule = super().make(training, peak, steps_per_epoch)
        if schedule.warmup_steps == 0:
            return cls(peak, schedule.total_steps, round(ONECYCLE_RISE * schedule.total_steps), steps_per_epoch)
        return schedule

    def rate(self, step: int) -> float:
        initial = self.peak / ONECYCLE_DIV
        if step < self.warmup_steps:
            return cosine(initial, self.peak, step / self.warmup_steps)
        fall = max(1, self.total_steps - self.warmup_steps)
        return cosine(self.peak, initial / ONECYCLE_FINAL_DIV, (step - self.warmup_steps) / fall)
