"""Successive halving over epochs: every trial trains to the first rung (a few epochs), only the
best 1/eta go on to the next, and so on up to the full budget (Jamieson & Talwalkar 2016; the
rung schedule and promotion rule of Li et al. 2018, "A System for Massively Parallel
Hyperparameter Tuning", ASHA, run here synchronously: a rung's decisions wait for all its trials,
so they do not depend on which trial finished first).

Training goes through a `train_to(trial_ids, epoch) -> {trial_id: history}` callable that the
caller provides: "train each of these trials up to `epoch`, continuing from wherever it stopped,
and return its per-epoch history". The flow passes one that trains the trials as parallel tasks
(flows/search.py); `tasks.training.sequential.SequentialTrainer` is the one-by-one version the benchmark
and the tests use. Because `tasks.training.train.train_trial` resumes bit-identically from its checkpoint,
a trial promoted to the next rung ends with the same weights as if it had been trained to that
rung in one go. Trial ids are learning rates (floats) by default; any hashable ids work with a
mapping id -> learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.evaluation.ranking import higher_is_better, rank
from tasks.search.checks import check_int

# `train_to(trial_ids, epoch)`: train those trials up to `epoch` (resuming), return their histories
# (lists of per-epoch dicts with epoch/train_loss/train_accuracy/val_loss/val_accuracy). A trial
# that failed (diverged, crashed) is left out of the returned dict.
TrainTo = Callable[[list, int], Mapping[Any, list[dict]]]

def rung_epochs(max_epochs: int, grace_epochs: int = 1, reduction_factor: int = 3) -> list[int]:
    """The epochs at which trials are compared: grace * eta**k for every k with a value below
    `max_epochs`, then `max_epochs` itself (ASHA's rungs with min resource `grace`, capped at the
    full budget). (5, 1, 3) -> [1, 3, 5]; (27, 1, 3) -> [1, 3, 9, 27]; (5, 2, 2) -> [2, 4, 5]."""
    check_int("max_epochs", max_epochs, 1)
    check_int("grace_epochs", grace_epochs, 1)
    check_int("reduction_factor", reduction_factor, 2)
    rungs, epochs = [], grace_epochs
    while epochs < max_epochs:
        rungs.append(epochs)
        epochs *= reduction_factor
    return rungs + [max_epochs]


def check_rungs(rungs: Sequence[int]) -> list[int]:
    rungs = list(rungs)
    if not rungs or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rungs):
        raise ValueError(f"rungs must be a non-empty list of positive epochs, got {rungs!r}")
    if any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"rungs must be strictly increasing, got {rungs!r}")
    return rungs


def survivors(scores: Mapping[Hashable, float], reduction_factor: int = 3, higher_is_better: bool = True,
              val_losses: Mapping[Hashable, float] | None = None,
              learning_rates: Mapping[Hashable, float] | None = None) -> tuple[list, list]:
    """(kept, stopped) at one rung: the best ceil(n / eta) of the n scored trials go on (at least
    one), best first; ties as in `rank`. A trial with a non-finite score is never kept, even when
    that leaves fewer than ceil(n / eta) (or none)."""
    check_int("reduction_factor", reduction_factor, 2)
    ordered = rank(scores, higher_is_better, val_losses, learning_rates)
    if not ordered:
        return [], []
    quota = max(1, math.ceil(len(ordered) / reduction_factor))
    kept = [t for t in ordered[:quota] if scores[t] is not None and math.isfinite(scores[t])]
    return kept, [t for t in ordered if t not in kept]


@dataclass
class HalvingResult:
    """What successive halving did. Ids are the trial ids given (learning rates by default)."""

    rungs: list[int]
    metric: str
    higher_is_better: bool
    rung_scores: dict[int, dict]  # rung epoch -> {id: metric at that epoch}
    stopped_at: dict  # id -> the rung epoch it was stopped at (not promoted)
    failed_at: dict  # id -> the rung epoch whose training it did not come back from
    epochs_trained: dict  # id -> epochs it was trained for (a failed one: its rung, an upper bound)
    finished: dict  # id -> full history of every trial that reached the last rung
    best: Hashable | None  # the best finished trial (ties as in `rank`), None when none finished
    learning_rates: dict = field(default_factory=dict)

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs_trained.values())

    def as_dict(self) -> dict:
        def keyed(mapping):
            return {str(k): v for k, v in mapping.items()}

        return {
            "rungs": self.rungs, "metric": self.metric, "best": self.best,
            "best_learning_rate": self.learning_rates.get(self.best) if self.best is not None else None,
            "rung_scores": {str(r): keyed(s) for r, s in self.rung_scores.items()},
            "stopped_at": keyed(self.stopped_at), "failed_at": keyed(self.failed_at),
            "epochs_trained": keyed(self.epochs_trained), "total_epochs": self.total_epochs,
            "finished": keyed(self.finished),
        }


def record_at(history: Sequence[dict] | None, epoch: int) -> dict | None:
    """The history entry of `epoch`, or None when the history does not reach it."""
    if not history or len(history) < epoch:
        return None
    record = history[epoch - 1]
    return record if record.get("epoch") == epoch else next((r for r in history if r.get("epoch") == epoch), None)


def successive_halving(trials: Mapping[Hashable, float] | Iterable[float], rungs: Sequence[int],
                       reduction_factor: int, train_to: TrainTo, metric: str = "val_accuracy",
                       log: Callable[[str], None] | None = None) -> HalvingResult:
    """Synchronous successive halving over epochs.

    `trials`: learning rates (each its own id), or a mapping id -> learning rate. At each rung,
    `train_to(ids, rung)` trains the trials still in up to that epoch (a promoted trial continues
    from its checkpoint), their `metric` at that epoch is compared, and the best ceil(n / eta) go
    on (`survivors`); at the last rung every trial left is finished. With 9 trials, rungs
    [1, 3, 5] and eta 3 that is 9x1 + 3x2 + 1x2 = 17 epochs against the grid's 45.

    Synchronous rather than asynchronous (ASHA proper): all trials of a rung are known before
    anyone is promoted, so the outcome does not depend on which trial the scheduler ran first, and
    the caller's `train_to` can run a whole rung in parallel. A trial missing from what
    `train_to` returns (diverged, crashed), or whose metric is not finite, is failed at that rung.
    """
    check_int("reduction_factor", reduction_factor, 2)
    rungs = check_rungs(rungs)
    higher = higher_is_better(metric)
    if isinstance(trials, Mapping):
        learning_rates = dict(trials)
    else:
        learning_rates = {lr: lr for lr in trials}
    if not learning_rates:
        raise ValueError("trials is empty: nothing to search")
    say = log or (lambda message: None)

    active = list(rank({t: 0.0 for t in learning_rates}, learning_rates=learning_rates))
    rung_scores: dict[int, dict] = {}
    stopped_at, failed_at, epochs_trained, finished = {}, {}, {}, {}
    for position, rung in enumerate(rungs):
        if not active:
            break
        histories = train_to(list(active), rung)
        scores, losses = {}, {}
        for trial in active:
            record = record_at(histories.get(trial), rung)
            epochs_trained[trial] = rung
            if record is None or not math.isfinite(record.get(metric, math.nan)):
                failed_at[trial] = rung
                continue
            scores[trial], losses[trial] = record[metric], record.get("val_loss")
        rung_scores[rung] = scores
        if position == len(rungs) - 1:
            finished = {t: list(histories[t][:rung]) for t in scores}
            break
        kept, stopped = survivors(scores, reduction_factor, higher, losses, learning_rates)
        for trial in stopped:
            stopped_at[trial] = rung
        say(f"rung {rung} epoch(s): {len(scores)} scored, {len(kept)} promoted "
            f"({', '.join(f'{learning_rates[t]:g}' for t in kept)}), {len(failed_at)} failed so far")
        active = kept

    last = rungs[-1]
    final = {t: h[last - 1][metric] for t, h in finished.items()}
    losses = {t: h[last - 1].get("val_loss") for t, h in finished.items()}
    order = rank(final, higher, losses, learning_rates)
    return HalvingResult(rungs=rungs, metric=metric, higher_is_better=higher, rung_scores=rung_scores,
                         stopped_at=stopped_at, failed_at=failed_at, epochs_trained=epochs_trained,
                         finished=finished, best=order[0] if order else None,
                         learning_rates=learning_rates)


def epoch_accounting(epochs_trained: Mapping[Any, int] | Iterable[int], grid_trials: int,
                     max_epochs: int) -> dict:
    """Epochs a search trained against the full grid's `grid_trials` x `max_epochs`."""
    check_int("grid_trials", grid_trials, 1)
    check_int("max_epochs", max_epochs, 1)
    values = list(epochs_trained.values()) if isinstance(epochs_trained, Mapping) else list(epochs_trained)
    spent = int(sum(values))
    grid = grid_trials * max_epochs
    return {"epochs_trained": spent, "grid_epochs": grid, "fraction_of_grid": spent / grid,
            "epochs_saved": grid - spent, "trials": len(values)}
