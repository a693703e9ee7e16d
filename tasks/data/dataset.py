"""The values the data sources and the training share: a prepared dataset (`DatasetRef`), its
splits on a device (`Splits`), a source's tensors before the split (`SourceData`), where a source
was found (`Located`), and the pixel arithmetic every source's tensors go through (resize,
statistics, normalisation). The sources (builtin, imagefolder, function) import this module and
nothing of each other or of `prepare`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from tasks.data.spec import DatasetInputError


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
    max_image_pixels: int | None = None  # an image folder's pixel limit per image, while decoding

    @property
    def image_size(self) -> int | tuple[int, int]:
        """N for N x N images (what a model factory is given), else (height, width)."""
        return self.height if self.height == self.width else (self.height, self.width)

    def as_metadata(self) -> dict:
        data = asdict(self)
        # Where the files sit on one machine, and how it reads them, say nothing about the model.
        for local in ("root", "spec", "data_dir", "resident", "num_workers", "max_image_pixels"):
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


def resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """(N, C, H, W) images at image_size x image_size (antialiased bilinear, as torchvision's
    Resize); unchanged when they have that size already or no size is asked for."""
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    from torchvision.transforms.v2 import functional

    return functional.resize(images, [image_size, image_size], antialias=True)


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


def channel_values(value: float | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Per-channel constants as a tuple; a model stored before they were per channel has one float."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def to_device(raw: torch.Tensor, ref: DatasetRef, device: torch.device) -> torch.Tensor:
    pixels = normalise_(to_unit(raw), ref.mean, ref.std)
    # channels_last is the layout the convolutions run fastest in (measured on CPU, and the
    # tensor-core layout on GPU); for one channel it costs nothing to store it that way.
    return pixels.to(device).contiguous(memory_format=torch.channels_last)


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


def located_ref(spec: str, located: Located, read: Callable[[], SourceData], data_dir: Path, val_size: int | None,
                split_seed: int, train_limit: int | None, image_size: int | None, num_workers: int) -> DatasetRef:
    """The DatasetRef of a source found at `located` whose tensors `read` gives. A val_size that
    leaves no image to train on is refused before `read` decodes anything (a folder's files are
    counted when it is located)."""
    if located.train_count is not None:
        held_out(located.train_count, located.val_folder, val_size)
    return tensor_ref(spec, located, read(), data_dir, val_size, split_seed, train_limit, image_size, num_workers)


def resident_splits(ref: DatasetRef, data: SourceData, device: torch.device) -> Splits:
    """A source's tensors split as `ref` says and moved to `device`, normalised."""
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


class DataSource(Protocol):
    """What a data source module implements (builtin.py, imagefolder.py, function.py)."""

    def prepare(self, spec: str, data_dir: Path, val_size: int | None, split_seed: int, train_limit: int | None,
                image_size: int | None, num_workers: int, allow_download: bool, max_image_pixels: int,
                write: bool = True) -> DatasetRef:
        """Locate the data, fingerprint it and read it once: the sweep's DatasetRef. Nothing is
        written but a built-in's install, and with `write` False (a dry run) not even that."""

    def store(self, ref: DatasetRef) -> None:
        """Write what `prepare` read and keeps for later processes (a decoded cache), once every
        check of the run has passed."""

    def splits(self, ref: DatasetRef, device: torch.device) -> Splits:
        """The data of a prepared `ref`, read again in this process, on `device`."""
