"""Where a trial's progress goes besides its Prefect progress artifact: observers in this process.

The command line adds one when stdout is a terminal (a bar per trial); nothing else needs to.
Observers hear (trial name, percent, status) and must be quick: they run in the trial's thread.
"""

from __future__ import annotations

import threading
from typing import Callable

Observer = Callable[[str, float, str], None]

_observers: list[Observer] = []
_lock = threading.Lock()


def add_observer(observer: Observer) -> None:
    with _lock:
        _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    with _lock:
        _observers.remove(observer)


def notify(trial: str, percent: float, status: str) -> None:
    with _lock:
        observers = list(_observers)
    for observer in observers:
        observer(trial, percent, status)
