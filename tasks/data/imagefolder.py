"""`imagefolder:PATH`: torchvision's ImageFolder layout, decoded once into a tensor cache.

    PATH/train/<class>/*.png    PATH/test/<class>/*.png    (optional) PATH/val/<class>/*.png

Classes are the sorted folder names of train/ (as torchvision's ImageFolder sorts them); test/
and val/ must have the same ones. Image files are those with torchvision's extensions, in sorted
order, nested folders included; hidden files and folders are skipped.

The folder's fingerprint is the digest of every image file's relative path (which carries its
split and class) and SHA-256: reading the bytes is far cheaper than decoding them, so it is
computed every time and a changed, added or removed file gives another fingerprint. The decoded
images are cached as uint8 tensors (N, C, H, W) in one safetensors file,
DATA_DIR/imagefolder-cache/<fingerprint>/images-<size>.safetensors: later trials, sweeps and
processes on the same data directory read that file instead of decoding again.

Images keep their channel count (1 for grey, 3 for RGB, 4 with alpha). A folder mixing counts
is read the way torchvision's ImageFolder reads every image, as RGB (grey repeated, alpha
dropped). Images of different sizes need --image-size N (a plain N x N antialiased resize, so a
non-square image is stretched, not cropped).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.files import file_lock, fsync_dir, temporary_sibling
from models.serialization import manifest_digest
from tasks.data.dataset import DatasetRef, Located, SourceData, Splits, located_ref, resident_splits, resize
from tasks.data.spec import DatasetInputError, dataset_label, parse_dataset_spec

# torchvision.datasets.folder.IMG_EXTENSIONS, without importing torchvision to list files.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
CACHE_FOLDER = "imagefolder-cache"
CACHE_FORMAT = "1"  # bump when the cached tensors would come out differently for the same files
# Folders of this many files or more are decoded by num_workers processes, DECODE_BATCH files a task.
PARALLEL_FROM = 4096
DECODE_BATCH = 512


@dataclass(frozen=True)
class FolderScan:
    """The image files of a folder, per split: (path relative to the root, class index)."""

    root: Path
    class_names: tuple[str, ...]
    files: dict[str, tuple[tuple[str, int], ...]]


def refuse(message: str, field: str = "dataset") -> DatasetInputError:
    return DatasetInputError(field, message)


def _class_folders(split: Path) -> tuple[str, ...]:
    return tuple(sorted(entry.name for entry in split.iterdir() if entry.is_dir() and not entry.name.startswith(".")))


def _images_under(folder: Path, root: Path) -> list[str]:
    """Relative paths of the image files under `folder`, sorted (string operations: a Path per
    file costs a second per 70,000 files)."""
    found = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        prefix = os.path.relpath(directory, root) + os.sep
        found += [prefix + name for name in sorted(names)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def scan_folder(root: Path) -> FolderScan:
    """The folder's classes and files; a folder that is not an ImageFolder is refused, naming
    what is missing."""
    where = f"imagefolder:{root}"
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise refuse(f"{where}: {root} is not a folder")
    if not (root / "train").is_dir():
        raise refuse(f"{where} has no train/ folder: expected PATH/train/CLASS/IMAGE and PATH/test/CLASS/IMAGE")
    if not (root / "test").is_dir():
        raise refuse(f"{where} has no test/ folder: expected PATH/train/CLASS/IMAGE and PATH/test/CLASS/IMAGE")
    class_names = _class_folders(root / "train")
    if not class_names:
        raise refuse(f"{where}: train/ holds no class folders (PATH/train/CLASS/IMAGE)")
    files: dict[str, tuple[tuple[str, int], ...]] = {}
    for split in SPLIT_FOLDERS:
        if not (root / split).is_dir():
            continue
        classes = _class_folders(root / split)
        if classes != class_names:
            missing, extra = sorted(set(class_names) - set(classes)), sorted(set(classes) - set(class_names))
            raise refuse(f"{where}: the class folders of {split}/ differ from train/'s"
                         f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}"
                         f"{' (not in train/: ' + ', '.join(extra) + ')' if extra else ''}")
        entries = []
        for index, name in enumerate(class_names):
            images = _images_under(root / split / name, root)
            if not images:
                raise refuse(f"{where}: {split}/{name}/ holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            entries += [(path, index) for path in images]
        files[split] = tuple(entries)
    return FolderScan(root, class_names, files)


def folder_fingerprint(scan: FolderScan) -> str:
    """Digest of every image file's relative path and SHA-256."""
    root = str(scan.root) + os.sep
    return manifest_digest({path: _sha256(root + path) for entries in scan.files.values() for path, _ in entries})


def _sha256(path: str) -> str:
    with open(path, "rb", buffering=0) as handle:  # an image file is read whole: one read, no buffer copy
        return hashlib.sha256(handle.read()).hexdigest()


def decode_image_file(path: Path) -> torch.Tensor:
    """One image as uint8 (C, H, W), channels as stored. torchvision's decoders (PNG, JPEG, GIF,
    WebP) first; PIL for the rest (BMP, TIFF, PPM/PGM) and for what they refuse."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError):
        image = _decode_with_pil(path)
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = (image.to(torch.int64) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)
    return image


def _decode_with_pil(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as opened:
        if opened.mode not in ("L", "LA", "RGB", "RGBA"):
            opened = opened.convert("RGBA" if "A" in opened.getbands() else "RGB")
        array = np.array(opened, dtype=np.uint8)
    return torch.from_numpy(array).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1).contiguous()


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """An image with 1-4 channels as RGB, as PIL's convert('RGB') does for L, LA, RGB, RGBA."""
    channels = image.shape[0]
    return image[:1].expand(3, -1, -1) if channels <= 2 else image[:3]


def _decoded_or_error(root: Path, path: str) -> torch.Tensor | str:
    try:
        return decode_image_file(root / path)
    except Exception as error:  # any decoder's complaint about a broken file
        return f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"


class _Decoder(torch.utils.data.Dataset):
    """The folder's files decoded in DataLoader worker processes (the decoders hold the GIL, so
    threads do not help); an unreadable file comes back as its error message."""

    def __init__(self, root: Path, paths: list[str]):
        self.root, self.paths = root, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        return _decoded_or_error(self.root, self.paths[index])


def _batch(items: list) -> tuple[str, object]:
    """A worker's batch as one stacked tensor when its images share a shape (one shared-memory
    block to send back instead of one per image), else as the list."""
    if all(isinstance(item, torch.Tensor) for item in items) and len({item.shape for item in items}) == 1:
        return "stacked", torch.stack(items)
    return "list", items


def decode_files(root: Path, paths: list[str], num_workers: int) -> list[torch.Tensor]:
    """Every file decoded, in order: in `num_workers` processes for a folder of PARALLEL_FROM
    files or more, here otherwise. The first unreadable file is refused."""
    if num_workers == 0 or len(paths) < PARALLEL_FROM:
        decoded = [_decoded_or_error(root, path) for path in paths]
    else:
        decoded = []
        loader = torch.utils.data.DataLoader(_Decoder(root, paths), batch_size=DECODE_BATCH, num_workers=num_workers,
                                             collate_fn=_batch)
        for kind, batch in loader:
            decoded += list(batch.unbind(0)) if kind == "stacked" else batch
    for item in decoded:
        if isinstance(item, str):
            raise refuse(f"imagefolder:{root}: {item}")
    return decoded


def decode_folder(scan: FolderScan, image_size: int | None, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Every image decoded, brought to one channel count and size, stacked per split."""
    every = decode_files(scan.root, [path for entries in scan.files.values() for path, _ in entries], num_workers)
    decoded, start = {}, 0
    for split, entries in scan.files.items():  # one pass (one set of workers) for all splits
        decoded[split], start = every[start:start + len(entries)], start + len(entries)
    counts = {image.shape[0] for images in decoded.values() for image in images}
    if len(counts) > 1:
        decoded = {split: [as_rgb(image) for image in images] for split, images in decoded.items()}
    if image_size is None:
        sizes = {}
        for split, images in decoded.items():
            for (path, _), image in zip(scan.files[split], images):
                sizes.setdefault(tuple(image.shape[1:]), path)
        if len(sizes) > 1:
            shown = ", ".join(f"{h}x{w} ({path})" for (h, w), path in list(sizes.items())[:3])
            raise refuse(f"imagefolder:{scan.root} has images of {len(sizes)} sizes ({shown}{', ...' if len(sizes) > 3 else ''}): "
                         "give image_size N to resize them all to N x N", field="image_size")
    tensors = {}
    for split, images in decoded.items():
        tensors[f"{split}_images"] = torch.stack([resize(image.unsqueeze(0), image_size)[0] for image in images])
        tensors[f"{split}_labels"] = torch.tensor([label for _, label in scan.files[split]], dtype=torch.int64)
    return tensors


def cache_file(data_dir: Path, fingerprint: str, image_size: int | None) -> Path:
    size = "native" if image_size is None else f"{image_size}x{image_size}"
    return Path(data_dir) / CACHE_FOLDER / fingerprint / f"images-{size}.safetensors"


def _read_cache(path: Path, scan: FolderScan) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when there are none (or a damaged file: decoded again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != CACHE_FORMAT or json.loads(metadata.get("classes", "null")) != list(scan.class_names):
            return None
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], scan: FolderScan) -> None:
    from safetensors.torch import save_file

    tmp = temporary_sibling(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": CACHE_FORMAT, "classes": json.dumps(list(scan.class_names))})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def cached_tensors(scan: FolderScan, fingerprint: str, data_dir: Path, image_size: int | None, num_workers: int = 0):
    """The folder's images as tasks.data.prepare.SourceData: from the cache, else decoded and cached.

    The decoding happens before the cache's lock is taken, so that a refused folder (an
    unreadable image, mixed sizes) leaves nothing behind in the data directory. The file is
    written under the lock, atomically, once: a process that finds it there reads it, and two
    first runs at the very same time both decode, the second then keeps the first one's file."""
    path = cache_file(data_dir, fingerprint, image_size)
    tensors = _read_cache(path, scan)
    if tensors is None:
        tensors = decode_folder(scan, image_size, num_workers)  # refusals here, before anything is written
        with file_lock(path.parent, ".lock"):
            if _read_cache(path, scan) is None:
                _write_cache(path, tensors, scan)
    val = "val_images" in tensors
    return SourceData(
        train_images=tensors["train_images"], train_labels=tensors["train_labels"],
        test_images=tensors["test_images"], test_labels=tensors["test_labels"], class_names=scan.class_names,
        val_images=tensors["val_images"] if val else None, val_labels=tensors["val_labels"] if val else None)


# --- the data-source protocol (tasks/data/dataset.py) ------------------------------------------

def prepare(spec: str, data_dir: Path, val_size: int | None, split_seed: int, train_limit: int | None,
            image_size: int | None, num_workers: int, allow_download: bool) -> DatasetRef:
    scan = scan_folder(Path(parse_dataset_spec(spec).target))
    located = Located("imagefolder", dataset_label(spec), scan.root, folder_fingerprint(scan),
                      train_count=len(scan.files["train"]), val_folder="val" in scan.files)
    return located_ref(spec, located,
                       lambda: cached_tensors(scan_folder(located.root), located.fingerprint, data_dir, image_size, num_workers),
                       data_dir, val_size, split_seed, train_limit, image_size, num_workers)


def splits(ref: DatasetRef, device: torch.device) -> Splits:
    data = cached_tensors(scan_folder(Path(ref.root)), ref.fingerprint, Path(ref.data_dir or ref.root), ref.resize,
                          ref.num_workers)
    return resident_splits(ref, data, device)
