"""The pre-flight: what SweepConfig's validation leaves to the run, because it needs the machine.

Validation is pure (a GPU deployment's config validates on a laptop, `--dry-run --device cuda`);
here, before anything is written or trained, the run asks the machine: is that GPU there, can the
directories be written, can the data source be read, does the model source build a network that
takes these images. Every refusal is an `InputError` naming the field to fix (exit 2 in the CLI).
"""

from __future__ import annotations

import os
from pathlib import Path

from models.config import ModelConfig
from models.errors import InputError
from models.user_code import SourceError


def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise InputError("device", f"{device!r} is not available: this machine has no CUDA GPU")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise InputError("device", f"{device!r} is not available: this machine has {torch.cuda.device_count()} GPU(s)")


def check_writable(field: str, path: Path) -> None:
    # Walk up to the first existing ancestor: that is where the directory will be created.
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(field, f"{str(path)!r} is not a directory ({str(probe)!r} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(field, f"{str(path)!r} is not writable ({str(probe)!r} refuses writes)")


def check_machine(config, probe_device: bool = True) -> None:
    """The device (unless not asked to) and the directories (no data read, nothing written)."""
    if probe_device:
        check_device(config.device)
    for field in ("registry_dir", "data_dir", "output_dir"):
        check_writable(field, getattr(config, field))


def check_run(config, dry_run: bool = False):
    """Everything `lr-sweep run` checks before it starts a server or writes a file: the machine,
    the data source and the model source. Returns the dataset it found. A dry run does not probe
    the device (a GPU deployment's config is checked on a laptop) nor download a dataset."""
    from tasks.data.config import DataConfig
    from tasks.data.prepare import prepare_configured, store_dataset
    from tasks.data.spec import DatasetInputError

    check_machine(config, probe_device=not dry_run)
    check_model_code(config)
    try:
        dataset = prepare_configured(DataConfig.of(config), allow_download=not dry_run, write=not dry_run)
    except (SourceError, DatasetInputError) as error:
        raise InputError(error.field, str(error)) from None
    check_model(config, dataset)
    if not dry_run:
        try:
            store_dataset(dataset)
        except DatasetInputError as error:
            raise InputError(error.field, str(error)) from None
    return dataset


def check_model_code(config) -> None:
    """User model code is found and imports, and names a function: before any data is read."""
    from models.user_code import load_callable

    source = ModelConfig.of(config).source()
    if source.kind == "user":
        try:
            load_callable(source.code(), "model", fresh=True)
        except SourceError as error:
            raise InputError(error.field, str(error)) from None


def check_model(config, dataset) -> None:
    """The model source builds a network that maps the dataset's images to its classes."""
    from models.sources import check_source
    from tasks.training.identity import input_shape

    source = ModelConfig.of(config).source()
    try:
        source.refresh()  # the code as it is now, if it changed since this process imported it
        check_source(source, input_shape(dataset))
    except SourceError as error:
        raise InputError(error.field, str(error)) from None
