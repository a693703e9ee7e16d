"""The LR range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks",
section 3.3; the fastai `lr_find` variant): one short run whose learning rate grows exponentially
from `min_lr` to `max_lr`, step by step, recording the loss (exponentially smoothed and
bias-corrected, stopped once the loss passes 4x its best). The suggestion is the rate of steepest
descent of the smoothed loss. Plain functions; the flow layer wraps them in tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from models.errors import InputError
from tasks.data.dataset import Splits
from tasks.data.prepare import load_splits, train_batches
from tasks.reporting import tracking
from tasks.reporting.legends import legend_beside
from tasks.results import TrialSpec
from tasks.search.checks import check_int, check_lr_range
from tasks.training.identity import input_shape
from tasks.training.train import epoch_order, init_model, make_optimizer

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class RangeTestResult:
    """One LR range test. `lrs[i]` is the rate of step i, `losses[i]` its mini-batch loss,
    `smoothed[i]` the bias-corrected exponential moving average up to step i."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    stopped_early: bool  # the smoothed loss passed divergence_factor x its best (or went NaN)
    min_lr: float
    max_lr: float
    planned_steps: int  # max_steps, capped at one epoch
    beta: float
    divergence_factor: float

    @property
    def best_lr(self) -> float:
        """The rate where the smoothed loss was lowest (too high to train at: fastai's rule of
        thumb is a tenth of it; reported for the chart, the suggestion is the steepest point)."""
        return self.lrs[int(np.argmin(self.smoothed))]

    def as_dict(self) -> dict:
        return asdict(self) | {"best_lr": self.best_lr}


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float]) -> float:
    """The learning rate of steepest descent of a smoothed range-test curve.

    d(loss)/d(log lr) by finite differences (`np.gradient`, central inside, one-sided at the
    ends) over the points up to the curve's minimum only: past the minimum the loss climbs
    towards the blow-up, and the noise there (a loss that jumps up and falls back) can fake a
    steep descent at a rate that does not train. The most negative slope wins (Smith 2015: the
    rate where the loss falls fastest; fastai's `steep` suggestion). Log-scale derivatives are
    what the schedule samples evenly, and what the chart shows.

    Raises ValueError when fewer than 3 points precede the minimum (the loss rose from the start:
    `min_lr` is already too high) or when the loss never falls (`max_lr` too low, or too few steps).
    """
    x = np.asarray(lrs, dtype=float)
    y = np.asarray(smoothed, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"lrs and smoothed must be 1-D and of one length, got {x.shape} and {y.shape}")
    if len(x) < 3 or not np.all(x > 0) or not np.all(np.diff(x) > 0):
        raise ValueError("lrs must hold at least 3 positive, strictly increasing learning rates")
    finite = np.isfinite(y)
    if not finite[0]:
        raise ValueError("the first smoothed loss is not finite: lower min_lr")
    # Up to the first non-finite point, then up to the minimum (the blown-up tail is cut).
    usable = int(np.argmin(finite)) if not finite.all() else len(y)
    end = int(np.argmin(y[:usable]))
    if end < 2:
        if usable < len(y) or np.max(y[:usable]) > 1.1 * y[0]:
            raise ValueError(
                f"the loss rose from the first steps (lowest at step {end}, lr {x[end]:.3g}): no "
                f"descent to read a suggestion from; lower min_lr (and max_lr)")
        raise ValueError("the loss never decreased over the range: raise max_lr or max_steps")
    # The slope is negative at least at the minimum's left neighbour (a first minimum is below
    # every earlier point), so the argmin below is a descent.
    slope = np.gradient(y[:end + 1], np.log(x[:end + 1]))
    return float(x[int(np.argmin(slope))])


def lr_range_test(spec: TrialSpec, splits: Splits, device: str | torch.device, *,
                  min_lr: float = 1e-7, max_lr: float = 10.0, max_steps: int = 100,
                  beta: float = 0.98, divergence_factor: float = 4.0) -> RangeTestResult:
    """Smith's LR range test on the trial's own network, optimizer, batch size and seed.

    `spec.learning_rate` and `spec.training.epochs` are ignored. One step per mini-batch, at most one
    epoch (`max_steps` is capped at the number of batches of an epoch, and the schedule is spread
    over the capped count so it still ends at `max_lr`), in the order of epoch 1 of the trial.
    The rate of step i is min_lr * (max_lr / min_lr) ** (i / (steps - 1)), set on the optimizer
    before the step. The loss is smoothed as avg = beta*avg + (1-beta)*loss and bias-corrected
    by 1 - beta**(i+1) (fastai; without the correction the first points sit near 0). The test
    stops once the smoothed loss passes `divergence_factor` x its lowest value, or the loss is
    not finite (fastai: 4x). The network and optimizer are thrown away afterwards.
    """
    check_lr_range(min_lr, max_lr)
    check_int("max_steps", max_steps, 3)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")
    size = splits.train_size
    steps = min(max_steps, math.ceil(size / spec.training.batch_size))
    if steps < 3:
        raise ValueError(f"one epoch of {size} images at batch {spec.training.batch_size} is {steps} steps; "
                         "the range test needs at least 3: lower batch_size")

    model = init_model(spec, device, input_shape(splits.dataset))
    model.train()
    optimizer = make_optimizer(spec.training.optimizer, model.parameters(), min_lr, weight_decay=spec.training.weight_decay)
    order = epoch_order(spec, 1, size, splits.device)
    batches = train_batches(splits, order, spec.training.batch_size)
    ratio = max_lr / min_lr
    lrs, losses, smoothed = [], [], []
    average, best, stopped = 0.0, math.inf, False
    for step in range(steps):
        lr = min_lr * ratio ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_images, batch_labels = next(batches)
        loss = nn.functional.cross_entropy(model(batch_images), batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # One read-back a step: the stop rule needs every step's value (100 steps by default).
        value = loss.item()
        average = beta * average + (1 - beta) * value
        debiased = average / (1 - beta ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(debiased)
        if not math.isfinite(debiased) or debiased > divergence_factor * best:
            stopped = True
            break
        best = min(best, debiased)

    try:
        if len(lrs) < 3:
            raise ValueError(f"the loss blew up after {len(lrs)} step(s), at lr {lrs[-1]:.3g}; lower "
                             "min_lr (and max_lr)")
        suggestion = suggest_lr(lrs, smoothed)
    except ValueError as error:
        raise InputError("min_lr", f"LR range test from {min_lr:g} to {max_lr:g} ({len(lrs)} of {steps} steps"
                         f"{', stopped: the loss blew up' if stopped else ''}): {error}") from None
    return RangeTestResult(lrs=lrs, losses=losses, smoothed=smoothed, suggestion=suggestion,
                           stopped_early=stopped, min_lr=min_lr, max_lr=max_lr, planned_steps=steps,
                           beta=beta, divergence_factor=divergence_factor)


def range_test_figure(result: RangeTestResult) -> Figure:
    """The range test as a chart: raw and smoothed loss against the rate, log x axis, the
    suggestion marked. Uses the Agg canvas directly, so it sets no global matplotlib backend and
    works on servers without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), layout="constrained")  # wider by the legend beside it
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(result.lrs, result.losses, color="0.7", linewidth=0.8, label="mini-batch loss")
    axes.plot(result.lrs, result.smoothed, color="C0", linewidth=2,
              label=f"smoothed (beta {result.beta:g}, bias-corrected)")
    index = result.lrs.index(result.suggestion)
    axes.axvline(result.suggestion, color="C3", linestyle="--", linewidth=1)
    axes.plot([result.suggestion], [result.smoothed[index]], "o", color="C3",
              label=f"suggestion {result.suggestion:.2g} (steepest descent)")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("training loss")
    axes.set_ylim(*loss_range(result))
    axes.set_title("LR range test" + (" (stopped: loss blew up)" if result.stopped_early else ""))
    axes.grid(True, which="major", alpha=0.3)  # a line a decade: the minor ones were 8 a decade
    legend_beside(axes)
    return figure


def loss_range(result: RangeTestResult) -> tuple[float, float]:
    """The chart's y-limits: every raw mini-batch loss from its lowest up to the highest one of
    the descent (the steps up to the smoothed loss's minimum, the part the suggestion is read
    from), with a margin. Above that the loss climbs to the blow-up, whose values would squash
    the rest of the curve."""
    finite = [(raw, smooth) for raw, smooth in zip(result.losses, result.smoothed)
              if math.isfinite(raw) and math.isfinite(smooth)]
    lowest = min(min(pair) for pair in finite)
    minimum = min(range(len(finite)), key=lambda step: finite[step][1])
    highest = max(max(pair) for pair in finite[:minimum + 1])
    margin = 0.05 * (highest - lowest)
    return lowest - margin, highest + margin


def plot_range_test(result: RangeTestResult, path: str | Path) -> Path:
    """The range test's chart as a PNG file, conventionally `lr_find.png`."""
    figure = range_test_figure(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def find_learning_rate(spec: TrialSpec, dataset, workspace, slots, *, min_lr: float, max_lr: float,
                       max_steps: int = 100) -> tuple[RangeTestResult, Path]:
    """The LR range test on the sweep's data, on a free device: its result, `lr_find.png` in the
    sweep's folder, and a W&B run (job type lr-find) holding the curve and the suggestion."""
    with slots.take() as device:
        result = lr_range_test(spec, load_splits(dataset, device), device, min_lr=min_lr, max_lr=max_lr,
                               max_steps=max_steps)
    chart = plot_range_test(result, workspace.sweep_dir / "lr_find.png")
    with tracking.trial_run(workspace.tracking, group=workspace.sweep_id, name="lr-find",
                            run_dir=workspace.sweep_dir, config=spec.record() | {"min_lr": min_lr, "max_lr": max_lr},
                            job_type="lr-find") as run:
        for step, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            run.log({"learning_rate": lr, "loss": loss, "smoothed_loss": smooth}, step=step)
        run.summary.update({"suggestion": result.suggestion, "best_lr": result.best_lr,
                            "stopped_early": result.stopped_early})
    return result, chart


def auto_grid(suggestion: float, factors: Sequence[float]) -> list[float]:
    """The rates `learning_rates: auto` sweeps, and `lr-sweep find` prints: each factor times the
    suggestion, to 3 significant digits, sorted, without duplicates."""
    return sorted({float(f"{factor * suggestion:.3g}") for factor in factors})
