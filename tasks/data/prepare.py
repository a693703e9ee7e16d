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

import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.data.builtin import locate_dataset, read_raw
from tasks.data.config import DataConfig
from tasks.data.spec import DatasetInputError, dataset_label, parse_dataset_spec


@dataclass(frozen=True)
class DatasetRef:
    """Which data a sweep trains on; small and serialisable, passed to every task.

    `mean` and `std` hold one value per channel (one for the grey built-ins); `resize` is the
    --image-size the images were resized to (None: their own size). `spec`, `root` (the files,
    or the image folder), `data_dir`, `resident` and `num_workers` say where and how this machine
    reads the data; they are not part of what the model was trained on (`as_metadata`)."""

    name: str
    root: str
    fingerprint: str
    val_size: int
    split_seed: int
    train_limit: int | None
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "builtin"  # builtin, imagefolder or function
    spec: str = ""  # the --dataset value; "" = `name` (a built-in)
    channels: int = 1
    height: int = 28
    width: int = 28
    num_classes: int = 10
    class_names: tuple[str, ...] | None = None
    val_folder: bool = False  # validation images from PATH/val, not split from train
    resize: int | None = None
    code_digest: str | None = None  # a dataset function's code (also part of the fingerprint)
    data_dir: str = ""
    resident: bool = True  # the splits live on the device as tensors; False: read by a DataLoader
    num_workers: int = 2

    @property
    def image_size(self) -> int | tuple[int, int]:
        """N for N x N images (what a model factory is given), else (height, width)."""
        return self.height if self.height == self.width else (self.height, self.width)

    def as_metadata(self) -> dict:
        data = asdict(self)
        # Where the files sit on one machine, and how it reads them, say nothing about the model.
        for local in ("root", "spec", "data_dir", "resident", "num_workers"):
            data.pop(local)
        for field in ("mean", "std", "class_names"):
            data[field] = None if data[field] is None else list(data[field])
        return data


@dataclass
class Splits:
    """The three splits on one device. Resident (the usual case): images (N, C, H, W) float32,
    normalised with `dataset.mean` and `dataset.std`, labels int64. A Dataset too large for
    memory: `loader` reads them batch by batch and the tensors are None. Batches come from
    `train_batches` and `eval_batches`, which serve both."""

    dataset: DatasetRef
    train_x: torch.Tensor | None
    train_y: torch.Tensor | None
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    loader: object | None = None  # tasks.data.function.LoaderSplits

    @property
    def train_size(self) -> int:
        return len(self.train_y) if self.loader is None else self.loader.sizes["train"]

    @property
    def device(self) -> torch.device:
        return self.train_y.device if self.loader is None else self.loader.device


def default_val_size(total: int) -> int:
    """One sixth of the training images: 10,000 of the built-ins' 60,000, as before val_size
    could be left unset."""
    return max(1, total // 6)


def split_indices(total: int, val_size: int, split_seed: int, train_limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices: a seeded permutation, the first `val_size` for validation."""
    if val_size >= total:
        raise DatasetInputError("val_size", f"val_size {val_size} leaves no training images out of {total}: "
                                f"give at most {total - 1}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(split_seed))
    val, train = order[:val_size], order[val_size:]
    if train_limit is not None:
        train = train[:train_limit]
    return train, val


@dataclass
class SourceData:
    """A source's images as tensors, before the split: uint8 (pixels / 255) or float (as they
    are), (N, C, H, W); labels int64. `val_*` only when the source has its own validation set."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...] | None = None
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class Located:
    """Where a source was found and what identifies it: what `prepare_dataset` reads from."""

    source: str
    name: str
    root: Path
    fingerprint: str
    train_count: int | None = None  # known before decoding (a folder's files)
    val_folder: bool = False


def builtin_source(name: str, root: Path, image_size: int | None) -> SourceData:
    images, labels = read_raw(name, root, train=True)
    test_images, test_labels = read_raw(name, root, train=False)
    return SourceData(resize(images.unsqueeze(1), image_size), labels,
                      resize(test_images.unsqueeze(1), image_size), test_labels)


def resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """(N, C, H, W) images at image_size x image_size (antialiased bilinear, as torchvision's
    Resize); unchanged when they have that size already or no size is asked for."""
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    from torchvision.transforms.v2 import functional

    return functional.resize(images, [image_size, image_size], antialias=True)


def locate(spec: str, data_dir: Path, allow_download: bool = True) -> Located:
    """Find a built-in or a folder and fingerprint it, without decoding anything."""
    kind = parse_dataset_spec(spec)
    if kind.kind == "builtin":
        root, fingerprint = locate_dataset(spec, data_dir, allow_download)
        return Located("builtin", spec, Path(root).resolve(), fingerprint)
    from tasks.data import imagefolder

    scan = imagefolder.scan_folder(Path(kind.target))
    return Located("imagefolder", dataset_label(spec), scan.root, imagefolder.folder_fingerprint(scan),
                   train_count=len(scan.files["train"]), val_folder="val" in scan.files)


def read_source(spec: str, located: Located, data_dir: Path, image_size: int | None, num_workers: int) -> SourceData:
    if located.source == "builtin":
        return builtin_source(spec, located.root, image_size)
    from tasks.data import imagefolder

    return imagefolder.cached_tensors(imagefolder.scan_folder(located.root), located.fingerprint,
                                      Path(data_dir), image_size, num_workers)


def prepare_dataset(name: str, data_dir: Path, val_size: int | None, split_seed: int,
                    train_limit: int | None, allow_download: bool = True, *, image_size: int | None = None,
                    num_workers: int = 2) -> DatasetRef:
    """Locate and verify the source `name` (a --dataset spec), fix the split and the per-channel
    normalisation: the sweep's DatasetRef. Bad input raises DatasetInputError naming the field."""
    if parse_dataset_spec(name).kind == "function":
        from tasks.data import function as user_data

        return user_data.prepare_function(name, data_dir, val_size, split_seed, train_limit, image_size, num_workers)
    located = locate(name, data_dir, allow_download)
    if located.train_count is not None:  # refused before a folder is decoded and cached
        held_out(located.train_count, located.val_folder, val_size)
    return tensor_ref(name, located, read_source(name, located, data_dir, image_size, num_workers), data_dir, val_size,
                      split_seed, train_limit, image_size, num_workers)


def tensor_ref(spec: str, located: Located, data: SourceData, data_dir: Path, val_size: int | None,
               split_seed: int, train_limit: int | None, image_size: int | None, num_workers: int) -> DatasetRef:
    """The DatasetRef of a source whose images are tensors in memory (the resident path)."""
    train_idx, val_count = train_and_val_counts(data, val_size, split_seed, train_limit)
    mean, std = pixel_statistics(data.train_images[train_idx])
    channels, height, width = data.train_images.shape[1:]
    return DatasetRef(
        name=located.name, root=str(located.root), fingerprint=located.fingerprint, val_size=val_count,
        split_seed=split_seed, train_limit=train_limit, train_size=len(train_idx),
        test_size=len(data.test_labels), mean=tuple(round(m, 6) for m in mean),
        std=tuple(round(s, 6) for s in std), source=located.source, spec=spec,
        channels=channels, height=height, width=width,
        num_classes=count_classes(data.class_names, data.train_labels, data.test_labels),
        class_names=data.class_names, val_folder=data.val_images is not None, resize=image_size,
        data_dir=str(Path(data_dir).resolve()), num_workers=num_workers,
    )


def held_out(total: int, val_folder: bool, val_size: int | None) -> int:
    """How many of the `total` training images are held out for validation (none when the
    source has its own validation images); a val_size that leaves none to train on is refused."""
    if val_folder:
        if val_size is not None:
            raise DatasetInputError("val_size", "the folder has its own val/ images: leave val_size unset")
        return 0
    val_size = default_val_size(total) if val_size is None else val_size
    if val_size >= total:
        raise DatasetInputError("val_size", f"val_size {val_size} leaves no training images out of {total}: "
                                f"give at most {total - 1}")
    return val_size


def train_and_val_counts(data: SourceData, val_size: int | None, split_seed: int,
                         train_limit: int | None) -> tuple[torch.Tensor, int]:
    """The training indices and the number of validation images of `data`."""
    val_folder = data.val_images is not None
    held = held_out(len(data.train_labels), val_folder, val_size)
    train = split_indices(len(data.train_labels), held, split_seed, train_limit)[0]
    return train, len(data.val_labels) if val_folder else held


def count_classes(class_names: tuple[str, ...] | None, *labels: torch.Tensor) -> int:
    """The number of classes: as many as there are names, else the largest label + 1."""
    largest = max(int(part.max()) for part in labels if len(part))
    return len(class_names) if class_names is not None else largest + 1


def to_unit(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels as values in [0, 1]; float pixels as they are (a new tensor either way)."""
    pixels = images.to(dtype, copy=True)
    return pixels.div_(255.0) if images.dtype == torch.uint8 else pixels


def pixel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) standard deviation of (N, C, H, W) images, pixels in [0, 1],
    accumulated in float64 over chunks: the whole split as floats would add 300 MB to the peak
    memory. One channel gives the very numbers of the flat (N, H, W) computation."""
    means, stds = [], []
    for channel in range(images.shape[1]):
        plane = images[:, channel]
        count, total, squares = plane.numel(), 0.0, 0.0
        for start in range(0, len(plane), chunk):
            block = to_unit(plane[start:start + chunk], torch.float64)
            total += block.sum().item()
            squares += block.square_().sum().item()
        mean = total / count
        means.append(mean)
        stds.append(math.sqrt((squares - count * mean * mean) / (count - 1)))
    return tuple(means), tuple(stds)


def normalise_(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(pixels - mean) / std per channel, in place on float (N, C, H, W) pixels. Channel by
    channel with Python numbers: for one channel exactly the arithmetic the grey built-ins always
    had, so their tensors (and the weights trained on them) stay bit for bit the same."""
    for channel, (m, s) in enumerate(zip(mean, std)):
        pixels[:, channel].sub_(m).div_(s)
    return pixels


def to_device(raw: torch.Tensor, ref: DatasetRef, device: torch.device) -> torch.Tensor:
    pixels = normalise_(to_unit(raw), ref.mean, ref.std)
    # channels_last is the layout the convolutions run fastest in (measured on CPU, and the
    # tensor-core layout on GPU); for one channel it costs nothing to store it that way.
    return pixels.to(device).contiguous(memory_format=torch.channels_last)


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
    if ref.source == "function":
        from tasks.data import function as user_data

        if not ref.resident:
            return user_data.loader_splits(ref, device)
        data = user_data.function_tensors(ref)
    else:
        located = Located(ref.source, ref.name, Path(ref.root), ref.fingerprint)
        data = read_source(ref.spec or ref.name, located, Path(ref.data_dir or ref.root), ref.resize, ref.num_workers)
    if ref.val_folder:
        train_idx = split_indices(len(data.train_labels), 0, ref.split_seed, ref.train_limit)[0]
        val_images, val_labels = data.val_images, data.val_labels
    else:
        train_idx, val_idx = split_indices(len(data.train_labels), ref.val_size, ref.split_seed, ref.train_limit)
        val_images, val_labels = data.train_images[val_idx], data.train_labels[val_idx]
    return Splits(
        dataset=ref, train_x=to_device(data.train_images[train_idx], ref, device),
        train_y=data.train_labels[train_idx].to(device),
        val_x=to_device(val_images, ref, device), val_y=val_labels.to(device),
        test_x=to_device(data.test_images, ref, device), test_y=data.test_labels.to(device),
    )


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


def channel_values(value: float | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Per-channel constants as a tuple; a model stored before they were per channel has one float."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


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


def prepare_configured(data: DataConfig, allow_download: bool = True) -> DatasetRef:
    """The DatasetRef of a config's data group: the one place its fields become arguments."""
    return prepare_dataset(data.dataset, data.data_dir, data.val_size, data.split_seed, data.train_limit,
                           allow_download, image_size=data.image_size, num_workers=data.num_workers)


@task(name="prepare_data", task_run_name="prepare {data.dataset}", cache_policy=NO_CACHE)
def prepare_data(data: DataConfig) -> DatasetRef:
    """Locate and verify the dataset once per sweep; every trial gets the same DatasetRef."""
    return prepare_configured(data)
