"""cosine: linear warmup, then cosine annealing to 0 at the last step (Loshchilov & Hutter 2017,
SGDR without restarts)."""

from __future__ import annotations

from tasks.training.schedules.base import Schedule, cosine


class Cosine(Schedule):
    NAME = "cosine"

    def after_warmup(self, step: int) -> float:
        rest = max(1, self.total_steps - self.warmup_steps)
        return cosine(self.peak, 0.0, (step - self.warmup_steps) / rest)
