"""Learning-rate search beyond the grid: the LR range test, successive halving, and TPE (Optuna).

Plain functions, no Prefect: the flow wraps them. Three tools, cheapest first:

1. **LR range test** (`lr_range_test`): one short run whose learning rate grows exponentially
   from `min_lr` to `max_lr`, step by step, recording the loss (Smith 2015, "Cyclical Learning
   Rates for Training Neural Networks", section 3.3; the fastai `lr_find` variant: exponential
   schedule, exponentially smoothed and bias-corrected loss, stop once the loss passes 4x its
   best). The suggestion is the rate of steepest descent of the smoothed loss.
2. **Successive halving** (`rung_epochs`, `survivors`, `successive_halving`): every trial trains
   to the first rung (a few epochs), only the best 1/eta go on to the next, and so on up to the
   full budget (Jamieson & Talwalkar 2016; the rung schedule and promotion rule of Li et al. 2018,
   "A System for Massively Parallel Hyperparameter Tuning", ASHA, run here synchronously: a rung's
   decisions wait for all its trials, so they do not depend on which trial finished first).
3. **Bayesian search** (`open_study`, `tpe_search`): Optuna's TPE sampler proposes learning rates
   (log-uniform prior) in batches of `parallel`, and each batch runs through the same rungs with
   the same promotion rule against every score seen at that rung so far. The study lives in an
   RDB storage (SQLite file by default), so a killed search resumes where it stopped.

Training goes through a `train_to(trial_ids, epoch) -> {trial_id: history}` callable that the
caller provides: "train each of these trials up to `epoch`, continuing from wherever it stopped,
and return its per-epoch history". `CheckpointedTrainer` is the sequential one (used by the
benchmark and the tests); the flow passes one that trains the trials as parallel tasks. Because
`tasks.train.train_trial` resumes bit-identically from its checkpoint, a trial promoted to the
next rung ends with the same weights as if it had been trained to that rung in one go.

Trial ids are learning rates (floats) by default: the search is over the learning rate, and an id
that *is* the rate lets a resumed Optuna trial find its checkpoint again (the rate round-trips
exactly through the study storage). `successive_halving` also accepts any hashable ids with a
mapping id -> learning rate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from torch import nn

from models.errors import InputError
from tasks import tracking
from tasks.data import Splits, load_splits
from tasks.results import TrialSpec
from tasks.train import TrainResult, TrialDiverged, checkpointed_history, epoch_order, init_model, make_optimizer, train_trial

if TYPE_CHECKING:  # optuna is imported where it is used: the rest of the module does not need it
    import optuna

# `train_to(trial_ids, epoch)`: train those trials up to `epoch` (resuming), return their histories
# (lists of per-epoch dicts with epoch/train_loss/train_accuracy/val_loss/val_accuracy). A trial
# that failed (diverged, crashed) is left out of the returned dict.
TrainTo = Callable[[list, int], Mapping[Any, list[dict]]]

METRICS = {"val_accuracy": True, "train_accuracy": True, "val_loss": False, "train_loss": False}
PARAM = "learning_rate"  # the one Optuna parameter


def metric_direction(metric: str) -> bool:
    """True when a higher value of `metric` is better (accuracies), False for losses."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    return METRICS[metric]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_lr_range(min_lr: float, max_lr: float, names: tuple[str, str] = ("min_lr", "max_lr")) -> None:
    for name, value in zip(names, (min_lr, max_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if min_lr >= max_lr:
        raise ValueError(f"{names[0]} ({min_lr:g}) must be smaller than {names[1]} ({max_lr:g})")


# --- 1. the LR range test ------------------------------------------------------------------------

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

    `spec.learning_rate` and `spec.epochs` are ignored. One step per mini-batch, at most one
    epoch (`max_steps` is capped at the number of batches of an epoch, and the schedule is spread
    over the capped count so it still ends at `max_lr`), in the order of epoch 1 of the trial.
    The rate of step i is min_lr * (max_lr / min_lr) ** (i / (steps - 1)), set on the optimizer
    before the step. The loss is smoothed as avg = beta*avg + (1-beta)*loss and bias-corrected
    by 1 - beta**(i+1) (fastai; without the correction the first points sit near 0). The test
    stops once the smoothed loss passes `divergence_factor` x its lowest value, or the loss is
    not finite (fastai: 4x). The network and optimizer are thrown away afterwards.
    """
    _check_lr_range(min_lr, max_lr)
    _check_int("max_steps", max_steps, 3)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")
    images, labels = splits.train_x, splits.train_y
    size = len(images)
    steps = min(max_steps, math.ceil(size / spec.batch_size))
    if steps < 3:
        raise ValueError(f"one epoch of {size} images at batch {spec.batch_size} is {steps} steps; "
                         "the range test needs at least 3: lower batch_size")

    model = init_model(spec, device)
    model.train()
    optimizer = make_optimizer(spec.optimizer, model.parameters(), min_lr)
    order = epoch_order(spec, 1, size, images.device)
    ratio = max_lr / min_lr
    lrs, losses, smoothed = [], [], []
    average, best, stopped = 0.0, math.inf, False
    for step in range(steps):
        lr = min_lr * ratio ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order[step * spec.batch_size:(step + 1) * spec.batch_size]
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
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


def plot_range_test(result: RangeTestResult, path: str | Path) -> Path:
    """The range test as a chart (raw and smoothed loss against the rate, log x axis, the
    suggestion marked); conventionally `lr_find.png`. Uses the Agg canvas directly, so it sets
    no global matplotlib backend and works on servers without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
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
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # the blown-up tail would squash the interesting part of the curve
        axes.set_ylim(min(finite) * 0.9, min(max(finite), result.smoothed[0] * 1.5) * 1.05)
    axes.set_title("LR range test" + (" (stopped: loss blew up)" if result.stopped_early else ""))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# --- 2. successive halving -----------------------------------------------------------------------

def rung_epochs(max_epochs: int, grace_epochs: int = 1, reduction_factor: int = 3) -> list[int]:
    """The epochs at which trials are compared: grace * eta**k for every k with a value below
    `max_epochs`, then `max_epochs` itself (ASHA's rungs with min resource `grace`, capped at the
    full budget). (5, 1, 3) -> [1, 3, 5]; (27, 1, 3) -> [1, 3, 9, 27]; (5, 2, 2) -> [2, 4, 5]."""
    _check_int("max_epochs", max_epochs, 1)
    _check_int("grace_epochs", grace_epochs, 1)
    _check_int("reduction_factor", reduction_factor, 2)
    rungs, epochs = [], grace_epochs
    while epochs < max_epochs:
        rungs.append(epochs)
        epochs *= reduction_factor
    return rungs + [max_epochs]


def _check_rungs(rungs: Sequence[int]) -> list[int]:
    rungs = list(rungs)
    if not rungs or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rungs):
        raise ValueError(f"rungs must be a non-empty list of positive epochs, got {rungs!r}")
    if any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"rungs must be strictly increasing, got {rungs!r}")
    return rungs


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
    """Ids from best to worst: the metric, then the lower validation loss (when given), then the
    smaller learning rate (when given; the cheaper, more stable choice), then the id. A
    non-finite score ranks last."""
    id_order = _id_order(scores)

    def key(trial):
        score = scores[trial]
        finite = score is not None and math.isfinite(score)
        metric = (-score if higher_is_better else score) if finite else math.inf
        loss = val_losses.get(trial) if val_losses else None
        loss = loss if loss is not None and math.isfinite(loss) else math.inf
        lr = learning_rates.get(trial, math.inf) if learning_rates else 0.0
        return (not finite, metric, loss, lr, id_order[trial])

    return sorted(scores, key=key)


def survivors(scores: Mapping[Hashable, float], reduction_factor: int = 3, higher_is_better: bool = True,
              val_losses: Mapping[Hashable, float] | None = None,
              learning_rates: Mapping[Hashable, float] | None = None) -> tuple[list, list]:
    """(kept, stopped) at one rung: the best ceil(n / eta) of the n scored trials go on (at least
    one), best first; ties as in `rank`. A trial with a non-finite score is never kept, even when
    that leaves fewer than ceil(n / eta) (or none)."""
    _check_int("reduction_factor", reduction_factor, 2)
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


def _record_at(history: Sequence[dict] | None, epoch: int) -> dict | None:
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
    _check_int("reduction_factor", reduction_factor, 2)
    rungs = _check_rungs(rungs)
    higher = metric_direction(metric)
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
            record = _record_at(histories.get(trial), rung)
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


# --- training through the rungs --------------------------------------------------------------------

class CheckpointedTrainer:
    """A sequential `train_to` over learning rates: each rate trains `base_spec` (with that
    learning rate) up to the asked epoch, resuming from its own checkpoint directory under
    `checkpoint_root`, so rung after rung continues bit-identically (tasks.train checkpoints
    model and optimizer after every epoch). A rate that diverges is left out of the answer.

    The checkpoint directory of a rate is named after the rate and a digest of the spec without
    its epoch count, plus the torch version; `checkpoint_root` must be specific to the dataset
    (and code) the trials run on: the flow derives it from its trial keys.

    After a call, `results[lr]` holds the last TrainResult of each rate (its weights included),
    `failed[lr]` the error of a diverged rate, and `trained` lists every (lr, epoch) that was
    actually trained by this object (an epoch restored from a checkpoint is not in it).
    """

    def __init__(self, base_spec: TrialSpec, splits: Splits, device: str | torch.device,
                 checkpoint_root: str | Path, on_epoch: Callable[[float, dict], None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.base_spec = base_spec
        self.splits = splits
        self.device = device
        self.checkpoint_root = Path(checkpoint_root)
        self.on_epoch = on_epoch
        self.log = log or (lambda message: None)
        self.results: dict[float, TrainResult] = {}
        self.failed: dict[float, str] = {}
        self.trained: list[tuple[float, int]] = []

    def spec(self, learning_rate: float, epochs: int) -> TrialSpec:
        return self.base_spec.model_copy(update={"learning_rate": float(learning_rate), "epochs": epochs})

    def checkpoint_dir(self, learning_rate: float) -> Path:
        identity = self.spec(learning_rate, 0).model_dump() | {"torch": torch.__version__}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.checkpoint_root / f"lr{float(learning_rate)!r}-seed{self.base_spec.seed}-{digest}"

    def __call__(self, learning_rates: Iterable[float], epoch: int) -> dict[float, list[dict]]:
        histories = {}
        for lr in learning_rates:
            if len(history := checkpointed_history(self.checkpoint_dir(lr))) >= epoch:
                histories[lr] = history[:epoch]  # already trained this far (a resumed search)
                continue
            spec = self.spec(lr, epoch)
            on_epoch = (lambda record, lr=lr: self.on_epoch(lr, record)) if self.on_epoch else None
            try:
                result = train_trial(spec, self.splits, self.device, self.checkpoint_dir(lr), on_epoch)
            except TrialDiverged as error:
                self.failed[lr] = str(error)
                self.log(f"lr {lr:g}: {error}")
                continue
            start = (result.resumed_from or 0) + 1
            self.trained.extend((lr, e) for e in range(start, epoch + 1))
            self.results[lr] = result
            histories[lr] = result.history
            record = result.history[-1]
            self.log(f"lr {lr:.4g} -> epoch {epoch}: val acc {record['val_accuracy']:.4f} "
                     f"val loss {record['val_loss']:.4f}"
                     + (f" (resumed from epoch {result.resumed_from})" if result.resumed_from else ""))
        return histories

    @property
    def epochs_run(self) -> int:
        return len(self.trained)


# --- compute accounting ------------------------------------------------------------------------------

def epoch_accounting(epochs_trained: Mapping[Any, int] | Iterable[int], grid_trials: int,
                     max_epochs: int) -> dict:
    """Epochs a search trained against the full grid's `grid_trials` x `max_epochs`."""
    _check_int("grid_trials", grid_trials, 1)
    _check_int("max_epochs", max_epochs, 1)
    values = list(epochs_trained.values()) if isinstance(epochs_trained, Mapping) else list(epochs_trained)
    spent = int(sum(values))
    grid = grid_trials * max_epochs
    return {"epochs_trained": spent, "grid_epochs": grid, "fraction_of_grid": spent / grid,
            "epochs_saved": grid - spent, "trials": len(values)}


# --- 3. Bayesian search: Optuna TPE, ask/tell --------------------------------------------------------

class StudyStorageError(RuntimeError):
    """The Optuna storage cannot be opened (bad URL, unreachable server, driver missing)."""


def default_storage_url(output_dir: str | Path) -> str:
    """sqlite:///OUTPUT_DIR/optuna.db (absolute), the storage when none is given."""
    return f"sqlite:///{(Path(output_dir) / 'optuna.db').resolve()}"


def _masked(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def _import_optuna():
    try:
        import optuna
    except ImportError as error:  # pragma: no cover - the project pins it
        raise ImportError("the TPE search needs optuna: pip install optuna==5.0.0") from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(storage: str, study_name: str = "lr-search", seed: int = 0, *,
               direction: str = "maximize", n_startup_trials: int = 10,
               connect_timeout_s: int = 10) -> "optuna.Study":
    """Create or load (same name: resume) an Optuna study on an RDB storage.

    `storage`: an SQLAlchemy URL, `sqlite:///path/optuna.db` (the default of the flow,
    `default_storage_url(OUTPUT_DIR)`; its folder is created) or `postgresql://user@host/db`
    for several workers. TPE is seeded with `seed`, uses the constant liar (the trials of a batch
    that are still running count as if they had a poor value, so one batch does not propose the
    same rate `parallel` times) and samples at random for its first `n_startup_trials`. No Optuna
    pruner: `tpe_search` decides the stops itself (see there). A server that does not answer
    within `connect_timeout_s`, a missing driver or a malformed URL raise StudyStorageError.
    """
    optuna = _import_optuna()
    import sqlalchemy.exc

    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    _check_int("n_startup_trials", n_startup_trials, 0)
    url = str(storage)
    engine_kwargs: dict = {}
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StudyStorageError(f"cannot create the folder of the study storage {url}: {error}") from error
        # Several processes on one SQLite file wait for the write lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"connect_timeout": connect_timeout_s}, "pool_pre_ping": True}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)
    try:
        rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        study = optuna.create_study(storage=rdb, study_name=study_name, sampler=sampler,
                                    pruner=optuna.pruners.NopPruner(), direction=direction,
                                    load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as error:
        kind = "its database driver is not installed" if isinstance(error, ImportError) else "it cannot be reached or opened"
        raise StudyStorageError(
            f"cannot open the Optuna study storage {_masked(url)} ({kind}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Give a reachable "
            "storage URL (sqlite:///path/optuna.db, postgresql://user@host/db with psycopg2 installed)") from None
    if study.direction.name.lower() != direction:
        raise ValueError(f"study {study_name!r} in {_masked(url)} was created to {study.direction.name.lower()}, "
                         f"not {direction}: use another study_name")
    return study


def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a process, None when there is no such process
    or no /proc: with the pid it identifies one process (a pid may be reused, this pair not)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_owner() -> dict:
    """Who runs a trial: host, boot, pid and the process's start time."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "start": _proc_start(os.getpid())}


def _owner_alive(owner: dict) -> bool | None:
    """True/False when this machine can tell whether the owner process still runs, None when
    the owner is on another host (or container: another hostname)."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") and owner.get("boot_id") != _boot_id():
        return False  # the machine rebooted since
    pid = int(owner.get("pid", -1))
    if owner.get("start") is not None:
        return _proc_start(pid) == owner["start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(trial, stale_after_s: float | None, now: float) -> bool:
    owner = trial.user_attrs.get("owner")
    if owner is not None:
        alive = _owner_alive(owner)
        if alive is not None:
            return not alive
    # Another host, or no owner recorded yet (killed between ask and the first attribute): judged
    # by the last heartbeat (set at ask and at every rung), when the caller gave a limit; without
    # one a trial of another host is never taken over, and one with no owner after a minute is.
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    heartbeat = trial.user_attrs.get("heartbeat", started)
    if stale_after_s is not None:
        return now - heartbeat > stale_after_s
    return owner is None and now - started > 60


def recover_stale_trials(study: "optuna.Study", stale_after_s: float | None = None) -> list[int]:
    """Fail the RUNNING trials whose driver is gone, and enqueue their learning rates again.

    A trial is gone when its owner (recorded at ask) ran on this host and that process no longer
    exists (pid and start time, so a reused pid does not count), or, for a trial of another host,
    when its heartbeat is older than `stale_after_s` (None: never; set it above the longest
    rung's training time when several hosts share a postgresql study). The rate is enqueued
    (`study.enqueue_trial`) before the trial is failed, and only when no WAITING trial already
    has it, so a crash in between does not enqueue it twice; the re-asked trial trains the same
    rate, whose checkpoints the caller's `train_to` finds again. Returns the failed trial numbers.
    """
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    now = time.time()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        if not _is_stale(trial, stale_after_s, now):
            continue
        if PARAM in trial.params:
            waiting = [t.system_attrs.get("fixed_params", t.params).get(PARAM)
                       for t in study.get_trials(deepcopy=False, states=(state.WAITING,))]
            if trial.params[PARAM] not in waiting:
                study.enqueue_trial({PARAM: trial.params[PARAM]}, user_attrs={"requeued_from": trial.number})
        study.tell(trial.number, state=state.FAIL, skip_if_finished=True)
        recovered.append(trial.number)
    return recovered


@dataclass
class SearchTrial:
    number: int
    learning_rate: float
    state: str  # complete | pruned | failed
    value: float | None  # the metric at the last epoch it was trained to
    epochs_trained: int
    stopped_at: int | None  # the rung epoch of a pruned trial
    requeued_from: int | None = None


@dataclass
class TPEResult:
    """The study as `tpe_search` left it (this call's trials and those of earlier, resumed ones)."""

    trials: list[SearchTrial]  # the ones that count towards n_trials (complete, pruned, diverged)
    best: SearchTrial | None  # the best complete trial (ties as in `rank`)
    epochs_trained: int  # sum over `trials` (what the search's decisions cost; see note in tpe_search)
    trained_now: list[int]  # numbers of the trials this call trained
    recovered: list[int]  # stale trials this call failed and re-enqueued
    stopped_by: str  # n_trials | epoch_budget

    def as_dict(self) -> dict:
        return asdict(self)


def _search_config(lr_range, rungs, metric, reduction_factor) -> dict:
    return {"lr_range": [float(lr_range[0]), float(lr_range[1])], "rungs": list(rungs),
            "metric": metric, "reduction_factor": reduction_factor}


def _summarise(study, higher: bool) -> tuple[list[SearchTrial], SearchTrial | None]:
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state == state.FAIL and not t.user_attrs.get("diverged"):
            continue  # abandoned by a killed driver: re-asked under a new number
        if t.state not in (state.COMPLETE, state.PRUNED, state.FAIL):
            continue
        name = {state.COMPLETE: "complete", state.PRUNED: "pruned", state.FAIL: "failed"}[t.state]
        trials.append(SearchTrial(
            number=t.number, learning_rate=t.params.get(PARAM), state=name,
            value=t.value if t.state != state.FAIL else None,
            epochs_trained=int(t.user_attrs.get("epochs_trained", 0)),
            stopped_at=t.last_step if t.state == state.PRUNED else None,
            requeued_from=t.user_attrs.get("requeued_from")))
    complete = {t.number: t for t in trials if t.state == "complete"}
    losses = {t.number: t.user_attrs.get(f"val_loss@{t.last_step}")
              for t in study.get_trials(deepcopy=False, states=(state.COMPLETE,))}
    order = rank({n: t.value for n, t in complete.items()}, higher, losses,
                 {n: t.learning_rate for n, t in complete.items()})
    return trials, (complete[order[0]] if order else None)


def tpe_search(study: "optuna.Study", n_trials: int, parallel: int, lr_range: tuple[float, float],
               rungs: Sequence[int], train_to: TrainTo, metric: str = "val_accuracy", *,
               reduction_factor: int = 3, epoch_budget: int | None = None,
               stale_after_s: float | None = None, log: Callable[[str], None] | None = None) -> TPEResult:
    """TPE over a log-uniform learning rate in `lr_range`, `parallel` trials at a time, each
    trained through `rungs` with early stopping; resumable on the same study.

    Per batch: `parallel` trials are asked (each proposes a rate; enqueued rates come first),
    `train_to(rates, rung)` trains them rung by rung; at each rung every trial reports its
    metric (`trial.report(value, epoch)`) and is stopped (told PRUNED) unless it is among the
    best ceil(n / eta) of ALL the scores recorded at that rung so far, in this study, this batch
    included (`survivors`, the same rule and ties as `successive_halving`). Trials that reach the
    last rung are told COMPLETE with their metric there.

    Why not Optuna's SuccessiveHalvingPruner: it decides for one trial at the moment that trial
    reports, against whatever else is in the storage, so within a batch the outcome depends on
    the order of the reports, and the first trials of a study are promoted for want of
    competitors; deciding once per rung for the whole batch keeps the rule synchronous, order-
    free and identical to the successive-halving driver. The rung scores come from the storage
    (intermediate values, val_loss in user attributes), so a resumed search decides as an
    uninterrupted one would.

    Stops when `n_trials` trials are finished (COMPLETE, PRUNED, or failed by divergence), or,
    with `epoch_budget`, before asking a batch once the finished trials' epochs reach it (the
    last batch may overshoot by up to its own cost). Resume: the same study (storage and name)
    continues; finished trials count and are not retrained; trials left RUNNING by a killed
    driver are failed and their rates asked again (`recover_stale_trials`); on an exception in
    `train_to` (or Ctrl-C) the open trials of the batch are failed and re-enqueued the same way
    before it propagates. A study created with a different rate range, rungs, metric or eta is
    refused. `epochs_trained` counts each trial's epochs once (a re-asked trial resumed from its
    checkpoint is counted up to the epoch it reached, not twice).
    """
    optuna = _import_optuna()
    _check_int("n_trials", n_trials, 1)
    _check_int("parallel", parallel, 1)
    _check_int("reduction_factor", reduction_factor, 2)
    if epoch_budget is not None:
        _check_int("epoch_budget", epoch_budget, 1)
    if not (isinstance(lr_range, (tuple, list)) and len(lr_range) == 2):
        raise ValueError(f"lr_range must be (min, max), got {lr_range!r}")
    _check_lr_range(lr_range[0], lr_range[1], ("lr_range min", "lr_range max"))
    rungs = _check_rungs(rungs)
    higher = metric_direction(metric)
    wanted = "maximize" if higher else "minimize"
    if study.direction.name.lower() != wanted:
        raise ValueError(f"metric {metric!r} is to {wanted}, but the study was created to "
                         f"{study.direction.name.lower()}: open_study(..., direction={wanted!r})")
    config = _search_config(lr_range, rungs, metric, reduction_factor)
    recorded = study.user_attrs.get("search_config")
    if recorded is None:
        study.set_user_attr("search_config", config)
    elif recorded != config:
        different = [k for k in config if recorded.get(k) != config[k]]
        raise ValueError(f"study {study.study_name!r} was run with {', '.join(f'{k}={recorded.get(k)}' for k in different)}; "
                         f"this search asks for {', '.join(f'{k}={config[k]}' for k in different)}: "
                         "resume with the same settings or use another study_name")
    say = log or (lambda message: None)
    distribution = {PARAM: optuna.distributions.FloatDistribution(lr_range[0], lr_range[1], log=True)}

    recovered = recover_stale_trials(study, stale_after_s)
    if recovered:
        say(f"resumed study {study.study_name!r}: trials {recovered} were left running by a stopped "
            "search; failed and their learning rates queued again")
    trained_now: list[int] = []
    stopped_by = "n_trials"
    while True:
        done, _ = _summarise(study, higher)
        remaining = n_trials - len(done)
        if remaining <= 0:
            break
        spent = sum(t.epochs_trained for t in done)
        if epoch_budget is not None and spent >= epoch_budget:
            stopped_by = "epoch_budget"
            break
        batch = []
        try:
            for _ in range(min(parallel, remaining)):
                trial = study.ask(distribution)
                batch.append(trial)
                trial.set_user_attr("owner", process_owner())
                trial.set_user_attr("heartbeat", time.time())
            trained_now.extend(t.number for t in batch)
            say(f"trials {[t.number for t in batch]}: learning rates "
                f"{', '.join(f'{t.params[PARAM]:.4g}' for t in batch)}")
            _run_batch(study, batch, rungs, train_to, metric, higher, reduction_factor, say)
        except BaseException:
            _abandon(study, batch)
            raise
    trials, best = _summarise(study, higher)
    return TPEResult(trials=trials, best=best, epochs_trained=sum(t.epochs_trained for t in trials),
                     trained_now=trained_now, recovered=recovered, stopped_by=stopped_by)


def _rung_pool(study, rung: int, exclude: set[int]) -> tuple[dict, dict, dict]:
    """Scores, val losses and rates at `rung` of every finished (complete or pruned) trial."""
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    scores, losses, rates = {}, {}, {}
    for t in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)):
        if t.number in exclude or rung not in t.intermediate_values:
            continue
        scores[t.number] = t.intermediate_values[rung]
        losses[t.number] = t.user_attrs.get(f"val_loss@{rung}")
        rates[t.number] = t.params.get(PARAM)
    return scores, losses, rates


def _run_batch(study, batch, rungs, train_to, metric, higher, reduction_factor, say) -> None:
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    open_trials = {t.number: t for t in batch}
    rate = {t.number: t.params[PARAM] for t in batch}
    for position, rung in enumerate(rungs):
        if not open_trials:
            return
        # One training per distinct rate: two trials of a batch may share an enqueued rate.
        histories = train_to(sorted({rate[n] for n in open_trials}), rung)
        scores, losses = {}, {}
        for number, trial in list(open_trials.items()):
            record = _record_at(histories.get(rate[number]), rung)
            trial.set_user_attr("epochs_trained", rung)
            trial.set_user_attr("heartbeat", time.time())
            if record is None or not math.isfinite(record.get(metric, math.nan)):
                trial.set_user_attr("diverged", True)
                study.tell(trial, state=state.FAIL)
                del open_trials[number]
                say(f"trial {number} (lr {rate[number]:.4g}) failed before epoch {rung}")
                continue
            trial.report(record[metric], rung)
            trial.set_user_attr(f"val_loss@{rung}", record.get("val_loss"))
            scores[number], losses[number] = record[metric], record.get("val_loss")
        if position == len(rungs) - 1:
            for number, trial in open_trials.items():
                trial.set_user_attr("history", list(histories[rate[number]][:rung]))
                study.tell(trial, scores[number])
                say(f"trial {number} (lr {rate[number]:.4g}) complete: {metric} {scores[number]:.4f}")
            return
        pool, pool_losses, pool_rates = _rung_pool(study, rung, exclude=set(open_trials))
        pool.update(scores)
        pool_losses.update(losses)
        pool_rates.update({n: rate[n] for n in scores})
        kept, _ = survivors(pool, reduction_factor, higher, pool_losses, pool_rates)
        for number in list(open_trials):
            if number not in kept:
                study.tell(open_trials.pop(number), state=state.PRUNED)
                say(f"trial {number} (lr {rate[number]:.4g}) stopped at epoch {rung}: "
                    f"{metric} {scores[number]:.4f} not in the best {len(kept)} of {len(pool)}")


def _abandon(study, batch) -> None:
    """The batch's trials that are still open: re-enqueue their rates, then fail them."""
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    for trial in batch:
        running = {t.number for t in study.get_trials(deepcopy=False, states=(state.RUNNING,))}
        if trial.number not in running:
            continue
        waiting = [t.system_attrs.get("fixed_params", t.params).get(PARAM)
                   for t in study.get_trials(deepcopy=False, states=(state.WAITING,))]
        if trial.params.get(PARAM) is not None and trial.params[PARAM] not in waiting:
            study.enqueue_trial({PARAM: trial.params[PARAM]}, user_attrs={"requeued_from": trial.number})
        study.tell(trial, state=state.FAIL, skip_if_finished=True)


# --- in a sweep: the range test as a step --------------------------------------------------------------

def find_learning_rate(spec: TrialSpec, dataset, workspace, slots, *, min_lr: float, max_lr: float,
                       max_steps: int = 100) -> tuple[RangeTestResult, Path]:
    """The LR range test on the sweep's data, on a free device: its result, `lr_find.png` in the
    sweep's folder, and a W&B run (job type lr-find) holding the curve and the suggestion."""
    with slots.take() as device:
        result = lr_range_test(spec, load_splits(dataset, device), device, min_lr=min_lr, max_lr=max_lr,
                               max_steps=max_steps)
    chart = plot_range_test(result, workspace.sweep_dir / "lr_find.png")
    with tracking.trial_run(workspace.tracking, group=workspace.sweep_id, name="lr-find",
                            run_dir=workspace.sweep_dir, config=spec.model_dump() | {"min_lr": min_lr, "max_lr": max_lr},
                            job_type="lr-find") as run:
        for step, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
            run.log({"learning_rate": lr, "loss": loss, "smoothed_loss": smooth}, step=step)
        run.summary.update({"suggestion": result.suggestion, "best_lr": result.best_lr,
                            "stopped_early": result.stopped_early})
    return result, chart


def study_name(config_identity: dict) -> str:
    """One study per search: the same command (same data, network, range, rungs) gives the same
    name, so running it again resumes the study."""
    return "lr-search-" + hashlib.sha256(json.dumps(config_identity, sort_keys=True).encode()).hexdigest()[:16]


@task(name="find_learning_rate", task_run_name="LR range test {min_lr:g}..{max_lr:g}", cache_policy=NO_CACHE)
def find_learning_rate_task(spec: TrialSpec, dataset, workspace, slots, min_lr: float, max_lr: float) -> RangeTestResult:
    result, chart = find_learning_rate(spec, dataset, workspace, slots, min_lr=min_lr, max_lr=max_lr)
    image = base64.b64encode(chart.read_bytes()).decode()
    create_markdown_artifact(
        key="lr-find", description=f"LR range test of sweep {workspace.sweep_id}",
        markdown=f"# LR range test\n\nSuggested learning rate **{result.suggestion:.3g}** (steepest descent of "
                 f"the smoothed loss, {len(result.lrs)} steps from {min_lr:g} to {max_lr:g}"
                 f"{', stopped on blow-up' if result.stopped_early else ''}).\n\n"
                 f"![lr_find](data:image/png;base64,{image})\n")
    get_run_logger().info(f"LR range test: suggestion {result.suggestion:.3g} ({chart})")
    return result
