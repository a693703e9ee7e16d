"""Where a sweep's progress goes besides its Prefect artifacts: observers in this process.

The command line adds one (flows/live_view.py): a live view in a terminal, a line per finished
epoch elsewhere. Observers hear `TrialEvent`s and `SweepEvent`s and must be quick: they run in the
trial's thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class TrialEvent:
    """Where one trial is. `status` is the text the UI's progress artifact shows; the rest is for
    views that draw more than a bar."""

    trial: str  # lr0.001-seed0
    percent: float
    status: str
    # waiting (for a device), training, reused, stopped (by a search), diverged, failed, retrying, done
    state: str = "training"
    learning_rate: float | None = None
    seed: int | None = None
    epoch: int | None = None  # the epoch just finished
    epochs: int | None = None
    record: dict = field(default_factory=dict)  # that epoch's losses and accuracies
    images_per_second: float | None = None
    pack: str | None = None  # "2/3": the trial trains as member 2 of a pack of 3
    model: str | None = None  # the stored (or reused) model, e.g. fashion-mnist-cnn:v0


@dataclass(frozen=True)
class SweepEvent:
    """The sweep has started: its id, how many trials it plans, where to watch it."""

    sweep_id: str
    trials: int
    epochs: int
    flow_run_url: str | None = None
    wandb: str | None = None  # the W&B project page online, the runs' folder offline


Observer = Callable[[TrialEvent | SweepEvent], None]

_observers: list[Observer] = []
_lock = threading.Lock()


def add_observer(observer: Observer) -> None:
    with _lock:
        _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    with _lock:
        _observers.remove(observer)


def publish(event: TrialEvent | SweepEvent) -> None:
    with _lock:
        observers = list(_observers)
    for observer in observers:
        observer(event)


def notify(trial: str, percent: float, status: str, **details) -> None:
    """A trial's progress: `details` are TrialEvent's other fields."""
    publish(TrialEvent(trial, percent, status, **details))
