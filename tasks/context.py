"""SweepContext: where the tasks of one sweep store and report what they produce.

It is built once by the flow from SweepConfig and handed to every task, so no task reads the
config's defaults on its own. It is a small frozen dataclass: it crosses into other flow runs
(per-trial dispatch) as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.registry import ModelRegistry, open_registry
from tasks.devices import DeviceSlots, device_slots


@dataclass(frozen=True)
class SweepContext:
    sweep_id: str
    sweep_dir: Path
    checkpoint_root: Path
    collection: str
    wandb_mode: str
    wandb_project: str
    wandb_entity: str | None
    registry_backend: str
    registry_dir: Path
    devices: tuple[str, ...]
    trials_per_device: int
    wandb_registry_collection: str | None = None

    def registry(self) -> ModelRegistry:
        return open_registry(self.registry_backend, self.registry_dir,
                             project=self.wandb_project, entity=self.wandb_entity,
                             registry_collection=self.wandb_registry_collection)

    def slots(self) -> DeviceSlots:
        return device_slots(list(self.devices), self.trials_per_device)
