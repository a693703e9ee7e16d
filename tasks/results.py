"""The typed values that travel between the steps of a sweep, from the CLI to the alias.

A trial is described by a `TrialSpec`, comes back as a `TrialOutcome` holding a `ModelRef`
(collection, version, digest), gains an `Evaluation` measured on the model fetched by that
reference, and the compare step returns a `Promotion`. They are frozen pydantic models: they
cross threads, Prefect parameters and (for dispatched trials) process and node boundaries as
JSON, never as pickles. They become dicts only where summary.json is written (tasks/reporting/report.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from models.names import trial_name  # noqa: F401 (re-exported: the tasks' import of it)
from models.registry import ModelRef

TrialStatus = Literal["completed", "failed", "diverged", "stopped"]


class Frozen(BaseModel):
    # extra="forbid": an outcome read back from another node is exactly an outcome, nothing more
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrialSpec(Frozen):
    """What makes one trial: its hyper-parameters. No defaults here: they live in SweepConfig."""

    learning_rate: float
    seed: int
    epochs: int
    batch_size: int
    hidden_units: int
    optimizer: str
    model: str
    model_args: dict
    lr_schedule: str
    warmup_epochs: float
    weight_decay: float | None
    precision: str

    @property
    def name(self) -> str:
        return trial_name(self.learning_rate, self.seed)


class Evaluation(Frozen):
    """A stored model measured on the sweep's validation and test splits."""

    val_loss: float
    val_accuracy: float
    test_loss: float
    test_accuracy: float

    def metric(self, name: str) -> float:
        return getattr(self, name)


class TrialOutcome(Frozen):
    """What one trial produced; `model` is set exactly when status is 'completed'."""

    learning_rate: float
    seed: int
    status: TrialStatus
    error: str | None = None
    model: ModelRef | None = None
    history: list[dict] = []
    evaluation: Evaluation | None = None
    train_seconds: float | None = None
    samples_per_second: float | None = None
    cached: bool = False
    resumed_from: int | None = None
    device: str | None = None
    wandb_run_dir: str | None = None
    wandb_url: str | None = None  # online runs only
    stopped_at: int | None = None  # searches: the rung epoch a stopped trial ended at
    setup_seconds: float | None = None  # before training: data onto the device, W&B run start
    wandb_start_seconds: float | None = None  # of which the W&B run's start
    worker: str | None = None  # dispatched trials: the worker and flow run that trained it
    flow_run: str | None = None
    # dispatched trials: every flow run it took, {flow_run, name, ended, reason}, the last one last
    attempts: list[dict] = []

    @property
    def name(self) -> str:
        return trial_name(self.learning_rate, self.seed)

    @property
    def usable(self) -> bool:
        return self.status == "completed" and self.evaluation is not None


class Promotion(Frozen):
    """The champion/challenger decision of one sweep (or one manual promotion)."""

    alias: str
    promoted: bool
    reason: str
    model: ModelRef | None = None
    previous: ModelRef | None = None
    challenger_evaluation: Evaluation | None = None
    holder_evaluation: Evaluation | None = None
    holder_error: str | None = None
