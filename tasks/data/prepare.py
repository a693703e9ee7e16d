"""Data sources, prepared once per sweep; their tensors loaded once per process and device.

A `--dataset` spec names one of three kinds of source (tasks/data/spec.py):
- a built-in (fashion-mnist, mnist, kmnist: tasks/data/builtin.py, IDX files verified by SHA-256);
- `imagefolder:PATH`, torchvision's folder layout, decoded once into a uint8 tensor cache keyed
  by the folder's fingerprint (tasks/data/imagefolder.py);
- a user function returning tensors or torch Datasets (tasks/data/function.py).

Every source ends as a `DatasetRef` (fingerprint, shape, classes, split sizes, per-channel
normalisation), the same for every trial. Training wants the whole dataset on the device as one
tensor with batches sliced from it (no DataLoader, see `load_splits`); only a Dataset too large
for memory is read by a DataLoader, and `train_batches` / `eval_batches` serve both the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.data import builtin, function, imagefolder
from tasks.data.config import DataConfig
from tasks.data.dataset import DatasetRef, DataSource, Splits, channel_values
from tasks.data.spec import DatasetInputError, parse_dataset_spec

# The data sources, one module each, by the kind of `--dataset` spec (tasks/data/spec.py). Each
# implements the protocol of tasks/data/dataset.py (`prepare`, `splits`); a new kind is one module
# and its line here (and its form in spec.py).
SOURCES: dict[str, DataSource] = {"builtin": builtin, "imagefolder": imagefolder, "function": function}


def prepare_dataset(name: str, data_dir: Path, val_size: int | None, split_seed: int,
                    train_limit: int | None, allow_download: bool = True, *, image_size: int | None = None,
                    num_workers: int = 2,
                    max_image_pixels: int = DataConfig.model_fields["max_image_pixels"].default,
                    write: bool = True) -> DatasetRef:
    """Locate and verify the source `name` (a --dataset spec), fix the split and the per-channel
    normalisation: the sweep's DatasetRef. Bad input raises DatasetInputError naming the field.
    Nothing is written but a built-in's install (`store_dataset` writes the rest); with `write`
    False (a dry run), nothing at all."""
    source = SOURCES[parse_dataset_spec(name).kind]
    return source.prepare(name, Path(data_dir), val_size, split_seed, train_limit, image_size, num_workers,
                          allow_download, max_image_pixels, write)


def store_dataset(ref: DatasetRef) -> None:
    """What preparing `ref` decoded, written for later trials and processes (an image folder's
    cache): once every check of the run has passed."""
    SOURCES[ref.source].store(ref)


_splits_cache: dict[tuple, Splits] = {}
_splits_lock = threading.Lock()


def load_splits(ref: DatasetRef, device: str | torch.device) -> Splits:
    """The splits of `ref` on `device`, loaded once per process and device, then shared."""
    key = (ref, str(device))
    with _splits_lock:
        if key not in _splits_cache:
            _splits_cache[key] = _build_splits(ref, torch.device(device))
        return _splits_cache[key]


def _build_splits(ref: DatasetRef, device: torch.device) -> Splits:
    return SOURCES[ref.source].splits(ref, device)


def train_batches(splits: Splits, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches of one epoch in `order` (a permutation of range(splits.train_size)):
    resident, `train_x[order[s:s + b]]`, an index slice on the device; from a DataLoader, the
    same images in the same order, normalised on the way and moved to the device."""
    if splits.loader is not None:
        yield from splits.loader.train_batches(order, batch_size)
        return
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        yield splits.train_x[batch], splits.train_y[batch]


def eval_batches(splits: Splits, which: Literal["val", "test"], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation or test images in their fixed order, `batch_size` at a time."""
    if which not in ("val", "test"):
        raise ValueError(f"which must be 'val' or 'test', got {which!r}")
    if splits.loader is not None:
        yield from splits.loader.eval_batches(which, batch_size)
        return
    images, labels = (splits.val_x, splits.val_y) if which == "val" else (splits.test_x, splits.test_y)
    yield from tensor_batches(images, labels, batch_size)


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive slices of resident tensors."""
    for start in range(0, len(labels), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def rescaling(data: DatasetRef, model_dataset: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift), each (1, C, 1, 1), taking images normalised with the data's constants to
    the model's: x_model = x_data * scale + shift. None when they are the same."""
    mean, std = channel_values(model_dataset["mean"]), channel_values(model_dataset["std"])
    if (mean, std) == (data.mean, data.std):
        return None
    # x_model = (raw - mean) / std with raw = x_data * data.std + data.mean
    scale = [ds / s for ds, s in zip(data.std, std)]
    shift = [(dm - m) / s for dm, m, s in zip(data.mean, mean, std)]
    return torch.tensor(scale).view(1, -1, 1, 1), torch.tensor(shift).view(1, -1, 1, 1)


def prepare_recorded(recorded: dict, spec: str | None, data_dir: Path) -> DatasetRef:
    """The data a stored model was measured on (its metadata's `dataset`), prepared again with
    the recorded split and size: a built-in by its recorded name; an image folder or a dataset
    function only as the command's own `spec` names it, since a registry entry never decides what
    is read or imported (the fingerprint check then says whether it is the same data)."""
    source = recorded.get("source", "builtin")
    if source != "builtin" and (spec is None or parse_dataset_spec(spec).kind != source):
        raise DatasetInputError("dataset", f"the model was trained on {source} data {recorded.get('name')!r}: "
                                "give that data as --dataset (imagefolder:PATH or module:function)")
    return prepare_dataset(recorded["name"] if source == "builtin" else spec, data_dir,
                           None if recorded.get("val_folder") else recorded["val_size"], recorded["split_seed"],
                           recorded["train_limit"], image_size=recorded.get("resize"))


def prepare_configured(data: DataConfig, allow_download: bool = True, write: bool = True) -> DatasetRef:
    """The DatasetRef of a config's data group: the one place its fields become arguments."""
    return prepare_dataset(data.dataset, data.data_dir, data.val_size, data.split_seed, data.train_limit,
                           allow_download, image_size=data.image_size, num_workers=data.num_workers,
                           max_image_pixels=data.max_image_pixels, write=write)


@task(name="prepare_data", task_run_name="prepare {data.dataset}", cache_policy=NO_CACHE)
def prepare_data(data: DataConfig) -> DatasetRef:
    """Locate and verify the dataset once per sweep; every trial gets the same DatasetRef."""
    return prepare_configured(data)
