"""What the flows share: the sweep's id, its trials, its workspace, and the SweepContext every
flow starts from.

The flows import this module and nothing of each other, so there is no import circle.
"""

from __future__ import annotations

import contextlib
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flows.config import SweepConfig
from flows.preflight import check_machine, check_model
from models.config import ModelConfig
from models.names import inside
from models.source_spec import short_name
from tasks.data.config import DataConfig
from tasks.data.dataset import DatasetRef
from tasks.data.prepare import prepare_data
from tasks.data.spec import dataset_label
from tasks.reporting import tracking
from tasks.results import TrialSpec
from tasks.training.determinism import configure_determinism
from tasks.training.devices import DeviceSlots, configure_cpu_threads, resolve_devices, slots_per_device
from tasks.workspace import RegistrySettings, TrackingSettings, Workspace

CHECKPOINTS_FOLDER = "checkpoints"
TRIAL_FLOW_NAME = "lr-sweep-trial"


def new_sweep_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def collection_name(config: SweepConfig) -> str:
    """One registry collection per dataset and model, as in W&B's model registry
    (fashion-mnist-cnn, my-folder-resnet18), unless the config names one."""
    return config.collection or f"{dataset_label(config.dataset)}-{short_name(config.model)}"


def trial_specs(config: SweepConfig, learning_rates: list[float] | None = None) -> list[TrialSpec]:
    """One spec per (learning rate, seed); `learning_rates` replaces the config's (auto, searches)."""
    return [TrialSpec.of(config, rate, seed) for rate, seed in config.trial_grid(learning_rates)]


def validated(config: SweepConfig) -> SweepConfig:
    """The flow's default config is built without validation (`model_construct`), so importing a
    flow module reads no LR_SWEEP_* variable and refuses nothing, while the run form still shows
    every field with its default. Here, at run time, the fields the caller set are validated
    together with the environment and the defaults, as the CLI does."""
    # The values themselves, not a dump: a dump masks the storage's password (flows/config.py).
    return SweepConfig(**{name: getattr(config, name) for name in config.model_fields_set})


def sweep_folder(config: SweepConfig, sweep_id: str | None = None) -> Path:
    """OUTPUT_DIR/SWEEP_ID, checked to lie inside the output directory whatever the id."""
    return inside(Path(config.output_dir).resolve(), sweep_id or config.sweep_id)


def make_workspace(config: SweepConfig, sweep_id: str) -> Workspace:
    """The workspace of a sweep (or of one trial of it), with its folder made and W&B's folders
    pointed into the output directory, ready for tasks to write. The sweep's folder is checked
    to lie inside the output directory, whatever the id."""
    output = Path(config.output_dir).resolve()
    workspace = Workspace(
        sweep_id=sweep_id, sweep_dir=sweep_folder(config, sweep_id), checkpoint_root=inside(output, CHECKPOINTS_FOLDER),
        collection=collection_name(config),
        tracking=TrackingSettings(mode=config.wandb_mode, project=config.wandb_project, entity=config.wandb_entity),
        registry=RegistrySettings(backend=config.registry, directory=Path(config.registry_dir).resolve(),
                                  project=config.wandb_project, entity=config.wandb_entity,
                                  registry_collection=config.wandb_registry_collection),
        model_source=ModelConfig.of(config).source(),
    )
    workspace.sweep_dir.mkdir(parents=True, exist_ok=True)
    tracking.point_wandb_dirs(output)
    return workspace


# The DatasetRef `lr-sweep run`'s pre-flight prepared, for the flow it runs next in this process.
# Set around that one call only: a long-lived process (`lr-sweep serve`) reads its data afresh
# for every run, so a folder that changed between runs is fingerprinted again.
_checked_dataset: ContextVar[tuple[DataConfig, DatasetRef] | None] = ContextVar("checked_dataset", default=None)


@contextlib.contextmanager
def checked_dataset(config: SweepConfig, dataset: DatasetRef):
    """Within this block a flow of `config` takes `dataset`, prepared by the pre-flight moments
    ago, instead of reading and fingerprinting every file again (or, for ImageFolders, loading
    every cached image twice)."""
    token = _checked_dataset.set((DataConfig.of(config), dataset))
    try:
        yield
    finally:
        _checked_dataset.reset(token)


def dataset_of(config: SweepConfig) -> DatasetRef:
    """The sweep's data, located, verified and decoded once (the prepare_data task), unless the
    pre-flight of this very run just did it for the same arguments."""
    data = DataConfig.of(config)
    checked = _checked_dataset.get()
    if checked is not None and checked[0] == data:
        return checked[1]
    return prepare_data(data)


@dataclass
class SweepContext:
    """What every flow sets up the same way before its first trial: devices and their slots, the
    dataset, the workspace. Built once per flow run by `from_config`."""

    config: SweepConfig
    sweep_id: str
    devices: list[str]
    threads: int
    slots: DeviceSlots
    dataset: DatasetRef
    workspace: Workspace

    @classmethod
    def from_config(cls, config: SweepConfig, sweep_id: str | None = None, per_device: int | None = None) -> SweepContext:
        """The pre-flight first (device, directories, data source, model source), so bad input
        is refused before anything is written; then the workspace's folders. `per_device`
        replaces the config's trials per device (the range test runs alone)."""
        configure_determinism(config.deterministic)  # before anything initialises CUDA
        check_machine(config)
        devices = resolve_devices(config.device)
        threads = configure_cpu_threads(devices)
        dataset = dataset_of(config)
        check_model(config, dataset)
        slots = DeviceSlots(devices, per_device or slots_per_device(devices, config.trials_per_device))
        sweep_id = sweep_id or config.sweep_id or new_sweep_id()
        return cls(config=config, sweep_id=sweep_id, devices=devices, threads=threads, slots=slots,
                   dataset=dataset, workspace=make_workspace(config, sweep_id))
