"""A user's dataset function: `package.module:function` or `path/to/file.py:function`.

The function takes no arguments and returns either tensors

    (train_images, train_labels, test_images, test_labels[, class_names])

with images (N, H, W) or (N, C, H, W), uint8 (pixels / 255) or float (taken as they are), and
integer labels; or torch Datasets

    (train, test[, class_names])

whose items are (image, label), the image a tensor (C, H, W) or (H, W), or a PIL image.

Tensors take the resident path (the whole split on the device, batches are index slices). A
Dataset is read once and materialised into the same resident path when its images fit in
RESIDENT_LIMIT_BYTES as float32; a larger one is read by a DataLoader each epoch (`num_workers`
processes, pinned memory on a GPU), in the very order and with the very normalisation of the
resident path. The fingerprint is the digest of the function's code digest and of every image
and label it returned, so a model names the exact data it was trained on; the function is
called once per process.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.serialization import manifest_digest
from models.user_code import SourceError, code_digest, load_callable, parse_code_spec
from tasks.data.dataset import (
    DatasetRef,
    Located,
    SourceData,
    Splits,
    count_classes,
    default_val_size,
    normalise_,
    resident_splits,
    resize,
    split_indices,
    tensor_ref,
    to_unit,
)
from tasks.data.spec import DatasetError, DatasetInputError, dataset_label

# Float32 pixels of train + test a Dataset may have to be materialised on the device: above it,
# the DataLoader path. Fashion-MNIST is 0.2 GiB.
RESIDENT_LIMIT_BYTES = 4 << 30
READ_BATCH = 512  # images per DataLoader batch when a Dataset is read once (materialised, or its statistics)
# Labels are class indices: the output layer has one unit per class up to the largest label, so a
# label of 1e12 would ask for terabytes. 100,000 classes is more than any image dataset has.
MAX_CLASSES = 100_000


@dataclass
class FunctionResult:
    """What a function returned, checked: tensors (SourceData) or Datasets, and its digests."""

    code_digest: str
    data: object  # tasks.data.prepare.SourceData or DatasetPair
    fingerprint: str | None = None  # of tensors; a DataLoader source's comes with its statistics


@dataclass
class DatasetPair:
    train: object
    test: object
    class_names: tuple[str, ...] | None
    sample_shape: tuple[int, ...]


_results: dict[tuple, FunctionResult] = {}
_results_lock = threading.Lock()


def refuse(spec: str, message: str, field: str = "dataset") -> DatasetInputError:
    return DatasetInputError(field, f"{spec}: {message}")


def call_function(spec: str, image_size: int | None) -> FunctionResult:
    """The function's result, checked; called once per process (and image size)."""
    key = (spec, image_size)
    with _results_lock:
        if key not in _results:
            try:
                code = parse_code_spec(spec, "dataset")
                digest = code_digest(code, "dataset")  # from the files, before any of them runs
                function = load_callable(code, "dataset")
            except SourceError as error:
                raise DatasetInputError(error.field, str(error)) from None
            try:
                returned = function()
            except Exception as error:
                raise refuse(spec, f"the function raised {type(error).__name__}: {error}") from None
            _results[key] = FunctionResult(digest, _check_result(spec, returned, image_size))
        return _results[key]


def _check_result(spec: str, returned, image_size: int | None):
    expected = ("(train_images, train_labels, test_images, test_labels[, class_names]) tensors "
                "or (train, test[, class_names]) Datasets")
    if not isinstance(returned, (tuple, list)):
        raise refuse(spec, f"returned a {type(returned).__name__}; expected {expected}")
    parts = list(returned)
    if len(parts) in (4, 5) and all(isinstance(p, torch.Tensor) for p in parts[:4]):
        names = _class_names(spec, parts[4] if len(parts) == 5 else None)
        train_x, test_x = (resize(_images(spec, which, parts[i]), image_size) for which, i in (("train", 0), ("test", 2)))
        train_y, test_y = _labels(spec, "train", parts[1], train_x), _labels(spec, "test", parts[3], test_x)
        if train_x.shape[1:] != test_x.shape[1:]:
            raise refuse(spec, f"train images are {tuple(train_x.shape[1:])}, test images {tuple(test_x.shape[1:])}: "
                         "give image_size N to resize both", field="image_size" if train_x.shape[1] == test_x.shape[1] else "dataset")
        _check_names(spec, names, train_y, test_y)
        return SourceData(train_x, train_y, test_x, test_y, names)
    if len(parts) in (2, 3) and all(hasattr(p, "__getitem__") and hasattr(p, "__len__") for p in parts[:2]) \
            and not any(isinstance(p, torch.Tensor) for p in parts[:2]):
        train, test = parts[0], parts[1]
        if not len(train) or not len(test):
            raise refuse(spec, "the train and test Datasets must each hold at least one image")
        names = _class_names(spec, parts[2] if len(parts) == 3 else getattr(train, "classes", None))
        image = _deterministic_first_item(spec, Samples(train, image_size))
        return DatasetPair(train, test, names, tuple(image.shape))
    raise refuse(spec, f"returned {len(parts)} value(s) of types {', '.join(type(p).__name__ for p in parts)}; "
                 f"expected {expected}")


def _deterministic_first_item(spec: str, samples: "Samples") -> torch.Tensor:
    """The first training item, read twice: a Dataset that gives another image each time is
    refused, since the data's fingerprint would change in every process (no trial reused,
    resumed or dispatched) and the cache would freeze its first draw."""
    (image, label), (again, label_again) = samples[0], samples[0]
    if label != label_again or image.shape != again.shape or not torch.equal(image, again):
        raise refuse(spec, "item 0 of the train Dataset differs between two reads: the dataset function must be "
                     "deterministic (random augmentation is not supported: the data is read once, fingerprinted "
                     "and cached, so every trial would train on a first draw frozen under a new fingerprint)")
    return image


def _images(spec: str, which: str, images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or not len(images):
        raise refuse(spec, f"{which} images must be (N, H, W) or (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if 0 in images.shape[1:]:
        raise refuse(spec, f"{which} images have shape {tuple(images.shape)}: no channels or no pixels "
                     "((N, C, H, W) with C, H, W >= 1)")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise refuse(spec, f"{which} images must be uint8 or float, got {images.dtype}")
    _finite(spec, which, images)
    return images.cpu()


def _finite(spec: str, which: str, images: torch.Tensor, first_index: int = 0) -> None:
    """NaN or inf pixels are the data's fault: refused here, not met as a diverged loss."""
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = first_index + int((~torch.isfinite(images)).flatten(1).any(1).nonzero()[0])
        raise refuse(spec, f"{which} images hold NaN or infinite pixels (first: image {bad}): the data must be "
                     "finite numbers")


def _labels(spec: str, which: str, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    if labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point() or labels.dtype == torch.bool \
            or labels.is_complex():
        raise refuse(spec, f"{which} labels must be integers, one per image ({len(images)}), "
                     f"got {labels.dtype} {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise refuse(spec, f"{which} labels must be >= 0")
    return labels.cpu().to(torch.int64)


def _class_names(spec: str, names) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise refuse(spec, "class names must be a sequence of strings")
    return tuple(names)


def _check_names(spec: str, names: tuple[str, ...] | None, *labels: torch.Tensor) -> None:
    """Labels are class indices 0..classes-1, with a name each when names are given, and there
    are two classes at least (the first labels are the training split's)."""
    largest = max(int(part.max()) for part in labels)
    if names is not None and largest >= len(names):
        raise refuse(spec, f"label {largest} has no class name ({len(names)} given)")
    if largest >= MAX_CLASSES:
        raise refuse(spec, f"labels go up to {largest}: labels are class indices 0..{MAX_CLASSES - 1} "
                     f"(at most {MAX_CLASSES:,} classes)")
    classes = torch.unique(labels[0])
    if len(classes) < 2:
        raise refuse(spec, f"the train labels hold a single class ({int(classes[0])}): a classifier needs two "
                     "classes at least, or there is nothing to tell apart")


class Samples(torch.utils.data.Dataset):
    """A user Dataset's items as (uint8 or float (C, H, W) tensor, int label), resized to
    image_size when one is asked for."""

    def __init__(self, dataset, image_size: int | None):
        self.dataset, self.image_size = dataset, image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if not isinstance(image, torch.Tensor):
            image = _to_tensor(image)
        if image.ndim == 2:
            image = image.unsqueeze(0)
        if image.ndim != 3:
            raise ValueError(f"item {index}: an image must be (C, H, W) or (H, W), got {tuple(image.shape)}")
        return resize(image.unsqueeze(0), self.image_size)[0], int(label)


def _to_tensor(image) -> torch.Tensor:
    from PIL import Image

    if isinstance(image, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(image)
    return torch.as_tensor(image)


def _read_all(spec: str, samples: Samples, num_workers: int):
    """Every item of a Dataset, READ_BATCH at a time in index order: (images, labels) batches."""
    loader = torch.utils.data.DataLoader(samples, batch_size=READ_BATCH, num_workers=num_workers)
    try:
        yield from loader
    except Exception as error:
        first = str(error).strip().splitlines()
        raise refuse(spec, f"reading the Dataset failed: {first[-1] if first else type(error).__name__}"
                     + ("; give image_size N if its images differ in size" if "stack expects" in str(error) else "")) from None


def _tensor_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def data_fingerprint(code_digest: str, data) -> str:
    """The digest of the function's code and of the tensors it gave."""
    parts = {"code": code_digest}
    for name in ("train_images", "train_labels", "test_images", "test_labels", "val_images", "val_labels"):
        if getattr(data, name) is not None:
            parts[name] = _tensor_digest(getattr(data, name))
    parts["class_names"] = hashlib.sha256(repr(data.class_names).encode()).hexdigest()
    return manifest_digest(parts)


def materialise(spec: str, pair: DatasetPair, image_size: int | None, num_workers: int):
    tensors = []
    for dataset in (pair.train, pair.test):
        batches = list(_read_all(spec, Samples(dataset, image_size), num_workers))
        tensors += [torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])]
    for which, images in (("train", tensors[0]), ("test", tensors[2])):
        _images(spec, which, images)
    _check_names(spec, pair.class_names, tensors[1], tensors[3])
    return SourceData(*tensors, class_names=pair.class_names)


def fits_resident(pair: DatasetPair) -> bool:
    count = 1
    for size in pair.sample_shape:
        count *= size
    return (len(pair.train) + len(pair.test)) * count * 4 <= RESIDENT_LIMIT_BYTES


def prepare_function(spec: str, data_dir: Path, val_size: int | None, split_seed: int, train_limit: int | None,
                     image_size: int | None, num_workers: int):
    """The DatasetRef of a dataset function's data."""
    result = call_function(spec, image_size)
    if isinstance(result.data, DatasetPair):
        if not fits_resident(result.data):
            return loader_ref(spec, result, data_dir, val_size, split_seed, train_limit, image_size, num_workers)
        result.data = materialise(spec, result.data, image_size, num_workers)
    if result.fingerprint is None:
        result.fingerprint = data_fingerprint(result.code_digest, result.data)
    located = Located("function", dataset_label(spec), Path(data_dir).resolve(), result.fingerprint)
    ref = tensor_ref(spec, located, result.data, data_dir, val_size, split_seed, train_limit, image_size, num_workers)
    return replace(ref, code_digest=result.code_digest)


def function_tensors(ref):
    """The resident tensors of a function's ref (the function is called in this process if it was
    not yet); refused when the function now returns other data than the ref was prepared from."""
    result = call_function(ref.spec, ref.resize)
    if isinstance(result.data, DatasetPair):
        result.data = materialise(ref.spec, result.data, ref.resize, ref.num_workers)
    if result.fingerprint is None:
        result.fingerprint = data_fingerprint(result.code_digest, result.data)
    if result.fingerprint != ref.fingerprint:
        raise DatasetError(f"{ref.spec} returned other data here (fingerprint {result.fingerprint[:12]}…) "
                           f"than the sweep prepared ({ref.fingerprint[:12]}…)")
    return result.data


# --- the DataLoader path -----------------------------------------------------------------------

def loader_ref(spec: str, result: FunctionResult, data_dir: Path, val_size: int | None, split_seed: int,
               train_limit: int | None, image_size: int | None, num_workers: int):
    """A large Dataset's DatasetRef, from one pass over it: per-channel statistics of the training
    split, and the digest of every image and label (train, then test)."""
    pair = result.data
    total = len(pair.train)
    val_size = default_val_size(total) if val_size is None else val_size
    train_idx, _ = split_indices(total, val_size, split_seed, train_limit)
    in_train = torch.zeros(total, dtype=torch.bool)
    in_train[train_idx] = True
    channels = pair.sample_shape[0]
    sums, squares, count = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0
    digests, largest = {}, []
    for which, dataset in (("train", pair.train), ("test", pair.test)):
        digest, start = hashlib.sha256(), 0
        for images, labels in _read_all(spec, Samples(dataset, image_size), num_workers):
            _finite(spec, which, images, start)
            digest.update(images.contiguous().reshape(-1).view(torch.uint8).numpy())
            digest.update(labels.numpy())
            largest.append(labels)
            if which == "train":
                block = images[in_train[start:start + len(images)]].to(torch.float64)
                if images.dtype == torch.uint8:
                    block.div_(255.0)
                sums += block.sum(dim=(0, 2, 3))
                squares += block.square().sum(dim=(0, 2, 3))
                count += block[:, 0].numel()
            start += len(images)
        digests[which] = digest.hexdigest()
    mean = sums / count
    std = ((squares - count * mean * mean) / (count - 1)).sqrt()
    labels = torch.cat(largest)
    _check_names(spec, pair.class_names, labels)
    result.fingerprint = manifest_digest({"code": result.code_digest, **digests,
                                          "class_names": hashlib.sha256(repr(pair.class_names).encode()).hexdigest()})
    return DatasetRef(
        name=dataset_label(spec), root=str(Path(data_dir).resolve()), fingerprint=result.fingerprint,
        val_size=val_size, split_seed=split_seed, train_limit=train_limit, train_size=len(train_idx),
        test_size=len(pair.test), mean=tuple(round(m, 6) for m in mean.tolist()),
        std=tuple(round(s, 6) for s in std.tolist()), source="function", spec=spec, channels=channels,
        height=pair.sample_shape[1], width=pair.sample_shape[2],
        num_classes=count_classes(pair.class_names, labels), class_names=pair.class_names, resize=image_size,
        code_digest=result.code_digest, data_dir=str(Path(data_dir).resolve()), resident=False,
        num_workers=num_workers)


class LoaderSplits:
    """The splits of a Dataset read by a DataLoader: the same indices as the resident path (the
    seeded split of the training Dataset), each batch normalised on the device."""

    def __init__(self, ref, pair: DatasetPair, device: torch.device):
        self.ref, self.device = ref, device
        self.datasets = {"train": Samples(pair.train, ref.resize), "test": Samples(pair.test, ref.resize)}
        train, val = split_indices(len(pair.train), ref.val_size, ref.split_seed, ref.train_limit)
        self.indices = {"train": train, "val": val, "test": torch.arange(len(pair.test))}
        self.sizes = {name: len(index) for name, index in self.indices.items()}

    def _batches(self, dataset, index: torch.Tensor, batch_size: int):
        batches = [index[start:start + batch_size].tolist() for start in range(0, len(index), batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.ref.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            pixels = normalise_(to_unit(images), self.ref.mean, self.ref.std)
            yield pixels.contiguous(memory_format=torch.channels_last), labels.to(self.device, non_blocking=True)

    def train_batches(self, order: torch.Tensor, batch_size: int):
        """`order` permutes the training split, as on the resident path."""
        yield from self._batches(self.datasets["train"], self.indices["train"][order.cpu()], batch_size)

    def eval_batches(self, which: str, batch_size: int):
        dataset = self.datasets["train" if which == "val" else "test"]
        yield from self._batches(dataset, self.indices[which], batch_size)


def loader_splits(ref, device: torch.device):
    result = call_function(ref.spec, ref.resize)
    if not isinstance(result.data, DatasetPair):
        raise DatasetError(f"{ref.spec} returned tensors here, Datasets where the sweep was prepared")
    return Splits(ref, None, None, None, None, None, None, loader=LoaderSplits(ref, result.data, device))


# --- the data-source protocol (tasks/data/dataset.py) ------------------------------------------

def prepare(spec: str, data_dir: Path, val_size: int | None, split_seed: int, train_limit: int | None,
            image_size: int | None, num_workers: int, allow_download: bool, max_image_pixels: int,
            write: bool = True) -> DatasetRef:
    return prepare_function(spec, data_dir, val_size, split_seed, train_limit, image_size, num_workers)


def store(ref: DatasetRef) -> None:
    """Nothing to keep: the sources' own files are read as they are."""


def splits(ref: DatasetRef, device: torch.device) -> Splits:
    if not ref.resident:
        return loader_splits(ref, device)
    return resident_splits(ref, function_tensors(ref), device)
