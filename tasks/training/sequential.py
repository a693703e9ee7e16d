"""A sequential `train_to` for the search algorithms: each learning rate trains in turn on one
device, resuming from its own checkpoint. The benchmark and the tests drive the algorithms with
it; a sweep trains its rungs as parallel Prefect tasks instead (flows/search.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tasks.data.dataset import Splits
from tasks.results import TrialSpec
from tasks.training.checkpoints import checkpointed_history
from tasks.training.identity import checkpoint_folder
from tasks.training.train import TrainResult, TrialDiverged, train_trial


class CheckpointedTrainer:
    """A sequential `train_to` over learning rates: each rate trains `base_spec` (with that
    learning rate) up to the asked epoch, resuming from its own checkpoint directory under
    `checkpoint_root`, so rung after rung continues bit-identically (tasks.training.train checkpoints
    model and optimizer after every epoch). A rate that diverges is left out of the answer.

    A rate's checkpoint folder is named as a sweep's trial would name it (`checkpoint_folder`:
    spec without its epoch count, dataset, code and torch version).

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
        return self.base_spec.but(learning_rate=float(learning_rate), epochs=epochs)

    def checkpoint_dir(self, learning_rate: float) -> Path:
        return self.checkpoint_root / checkpoint_folder(self.spec(learning_rate, self.base_spec.training.epochs), self.splits.dataset)

    def __call__(self, learning_rates: Iterable[float], epoch: int) -> dict[float, list[dict]]:
        histories = {}
        for lr in learning_rates:
            if len(history := checkpointed_history(self.checkpoint_dir(lr))) >= epoch:
                histories[lr] = history[:epoch]  # already trained this far (a resumed search)
                continue
            spec = self.spec(lr, max(epoch, self.base_spec.training.epochs))  # the schedule spans the whole trial
            on_epoch = (lambda record, lr=lr: self.on_epoch(lr, record)) if self.on_epoch else None
            try:
                result = train_trial(spec, self.splits, self.device, self.checkpoint_dir(lr), on_epoch, stop_at=epoch)
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
