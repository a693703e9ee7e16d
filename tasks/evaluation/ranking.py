"""Which trial is better: the metric's direction and the tie-breaks, decided once for the
compare step and for the search algorithms alike."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping

# Every metric a trial records per epoch, and whether a higher value is better.
METRICS = {"val_accuracy": True, "train_accuracy": True, "val_loss": False, "train_loss": False,
           "test_accuracy": True, "test_loss": False}


def higher_is_better(metric: str) -> bool:
    """True when a higher value of `metric` is better (accuracies), False for losses."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    return METRICS[metric]


def order_key(higher: bool, value: float | None, val_loss: float | None = None, *tie_breaks) -> tuple:
    """Sort key, best first: a finite metric before a non-finite one, then the metric, then the
    lower validation loss, then the caller's tie-breaks (the smaller learning rate, the seed...)."""
    finite = value is not None and math.isfinite(value)
    primary = (-value if higher else value) if finite else math.inf
    loss = val_loss if val_loss is not None and math.isfinite(val_loss) else math.inf
    return (not finite, primary, loss, *tie_breaks)


def _id_order(ids: Iterable[Hashable]) -> dict[Hashable, int]:
    """A deterministic rank of the ids themselves (the last tie-break): natural order when they
    compare (numbers, strings), else by their text."""
    ids = list(ids)
    try:
        ordered = sorted(ids)
    except TypeError:
        ordered = sorted(ids, key=repr)
    return {trial: index for index, trial in enumerate(ordered)}


def rank(scores: Mapping[Hashable, float], higher_is_better: bool = True,
         val_losses: Mapping[Hashable, float] | None = None,
         learning_rates: Mapping[Hashable, float] | None = None) -> list[Hashable]:
    """Ids from best to worst by `order_key`: the metric, the lower validation loss (when given),
    the smaller learning rate (when given; the cheaper, more stable choice), then the id."""
    id_order = _id_order(scores)

    def key(trial):
        loss = val_losses.get(trial) if val_losses else None
        lr = learning_rates.get(trial, math.inf) if learning_rates else 0.0
        return order_key(higher_is_better, scores[trial], loss, lr, id_order[trial])

    return sorted(scores, key=key)
