"""What the sweep flow and the per-trial flow share: the sweep's id, its trials, its workspace.

Both flows import this module and nothing of each other, so there is no import circle.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from flows.config import SweepConfig
from models.cnn import ARCHITECTURE_NAME
from models.names import inside
from tasks import tracking
from tasks.results import TrialSpec
from tasks.workspace import RegistrySettings, TrackingSettings, Workspace

CHECKPOINTS_FOLDER = "checkpoints"
TRIAL_FLOW_NAME = "lr-sweep-trial"


def new_sweep_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def collection_name(dataset: str) -> str:
    """One registry collection per dataset and architecture, as in W&B's model registry."""
    return f"{dataset}-{ARCHITECTURE_NAME}"


def trial_specs(config: SweepConfig, learning_rates: list[float] | None = None) -> list[TrialSpec]:
    """One spec per (learning rate, seed); `learning_rates` replaces the config's (auto, searches)."""
    return [TrialSpec(learning_rate=rate, seed=seed, epochs=config.epochs, batch_size=config.batch_size,
                      hidden_units=config.hidden_units, optimizer=config.optimizer)
            for rate, seed in config.trial_grid(learning_rates)]


def validated(config: SweepConfig) -> SweepConfig:
    """The flow's default config is built without validation (`model_construct`), so importing a
    flow module reads no LR_SWEEP_* variable and refuses nothing, while the run form still shows
    every field with its default. Here, at run time, the fields the caller set are validated
    together with the environment and the defaults, as the CLI does."""
    return SweepConfig(**config.model_dump(exclude_unset=True))


def make_workspace(config: SweepConfig, sweep_id: str) -> Workspace:
    """The workspace of a sweep (or of one trial of it), with its folder made and W&B's folders
    pointed into the output directory, ready for tasks to write. The sweep's folder is checked
    to lie inside the output directory, whatever the id."""
    output = Path(config.output_dir).resolve()
    workspace = Workspace(
        sweep_id=sweep_id, sweep_dir=inside(output, sweep_id), checkpoint_root=inside(output, CHECKPOINTS_FOLDER),
        collection=collection_name(config.dataset),
        tracking=TrackingSettings(mode=config.wandb_mode, project=config.wandb_project, entity=config.wandb_entity),
        registry=RegistrySettings(backend=config.registry, directory=Path(config.registry_dir).resolve(),
                                  project=config.wandb_project, entity=config.wandb_entity,
                                  registry_collection=config.wandb_registry_collection),
    )
    workspace.sweep_dir.mkdir(parents=True, exist_ok=True)
    tracking.point_wandb_dirs(output)
    return workspace
