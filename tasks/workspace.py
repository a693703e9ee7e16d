"""Where one sweep's tasks store and report what they produce.

The flow builds a `Workspace` once from SweepConfig and hands it to every task, so no task reads
the config's defaults on its own. Device slots are not in it: the flow hands those to the tasks
that need a device (tasks/training/devices.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.backends import open_registry
from models.registry import ModelRegistry
from models.sources import ModelSource


@dataclass(frozen=True)
class TrackingSettings:
    """Where W&B runs go: mode offline, online or disabled, and the project they belong to."""

    mode: str
    project: str
    entity: str | None


@dataclass(frozen=True)
class RegistrySettings:
    """Which registry stores the models, and how to open it."""

    backend: str
    directory: Path
    project: str
    entity: str | None
    registry_collection: str | None

    def open(self, run=None) -> ModelRegistry:
        return open_registry(self.backend, self.directory, project=self.project, entity=self.entity,
                             registry_collection=self.registry_collection, run=run)


@dataclass(frozen=True)
class Workspace:
    sweep_id: str
    sweep_dir: Path  # report, charts, summary.json, W&B runs of this sweep
    checkpoint_root: Path  # per-trial checkpoints, shared by sweeps (resume goes by trial key)
    collection: str  # registry collection of this dataset and architecture
    tracking: TrackingSettings
    registry: RegistrySettings
    # The model source the sweep's own config names: the only user code its tasks may import to
    # rebuild a stored model (models/sources.py `rebuild`).
    model_source: ModelSource | None = None
