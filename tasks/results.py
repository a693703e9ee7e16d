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

from models.config import ModelConfig
from models.names import trial_name
from models.registry import ModelRef
from tasks.training.config import TrainingConfig

# reused: an earlier run stored this exact trial's model (same trial key); nothing trained now
TrialStatus = Literal["completed", "reused", "failed", "diverged", "stopped"]


class Frozen(BaseModel):
    # extra="forbid": an outcome read back from another node is exactly an outcome, nothing more
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrialSpec(Frozen):
    """What makes one trial: its learning rate and seed, and the groups of the sweep's config that
    shape it (training, model). No defaults here: they live in the groups."""

    learning_rate: float
    seed: int
    training: TrainingConfig
    network: ModelConfig

    @classmethod
    def of(cls, config, learning_rate: float, seed: int) -> TrialSpec:
        """The trial of `config` (a SweepConfig) at one rate and seed."""
        return cls(learning_rate=learning_rate, seed=seed, training=TrainingConfig.of(config),
                   network=ModelConfig.of(config))

    @classmethod
    def shared(cls, config) -> TrialSpec:
        """What every trial of `config` shares; the searches set the rate (the seed is the first)."""
        return cls.of(config, 1.0, config.seeds[0])

    def but(self, **changes) -> TrialSpec:
        """This trial with `changes`: its learning_rate, seed, or fields of its training group
        (validated: a name that is no field is refused, not silently added)."""
        own = {name: changes.pop(name) for name in ("learning_rate", "seed") if name in changes}
        training = TrainingConfig.model_validate(self.training.model_dump() | changes) if changes else self.training
        return self.model_copy(update=own | {"training": training})

    def record(self) -> dict:
        """The trial as flat names, as users know them (`--epochs`): a stored model's "training"
        metadata and its W&B run's config."""
        return {"learning_rate": self.learning_rate, "seed": self.seed, **self.training.model_dump(),
                **self.network.model_dump()}

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
    """What one trial produced; `model` is set exactly when it has one (`has_model`)."""

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
    reused_from: str | None = None  # reused: the registry version it is, e.g. fashion-mnist-cnn:v0
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
    # how it trained (tasks/training/train.py engine_record): eager | graph | packed | packed+graph,
    # its pack {id, size}, why it trained otherwise than planned, deterministic algorithms on or not
    engine: str | None = None
    pack: dict | None = None
    engine_reason: str | None = None
    deterministic: bool | None = None

    @property
    def name(self) -> str:
        return trial_name(self.learning_rate, self.seed)

    @property
    def has_model(self) -> bool:
        """Trained now or reused: a stored model to evaluate and compare."""
        return self.status in ("completed", "reused")

    @property
    def usable(self) -> bool:
        return self.has_model and self.evaluation is not None


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
