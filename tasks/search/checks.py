"""Argument checks shared by the search algorithms and SweepConfig: one rule per argument kind."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_lr_range(min_lr: float, max_lr: float, names: tuple[str, str] = ("min_lr", "max_lr"),
                   upper: float = math.inf) -> None:
    """Both rates positive, finite and at most `upper`, the first below the second."""
    for name, value in zip(names, (min_lr, max_lr)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                           and 0 < value <= upper):
            bound = "" if upper == math.inf else f" and <= {upper:g}"
            raise ValueError(f"{name} must be a positive finite number{bound}, got {value!r}")
    if min_lr >= max_lr:
        raise ValueError(f"{names[0]} ({min_lr:g}) must be smaller than {names[1]} ({max_lr:g})")
