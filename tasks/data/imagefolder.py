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
processes on the same data directory read that file instead of decoding again. The decoder hashes
the very bytes it decodes, and the cache is written only under the fingerprint of those bytes; it
is written once every check of the run has passed (`store`), never by a dry run.

Each image is decoded and resized on its own (memory: the cache's size, not the photos' pixels);
one over `max_image_pixels` is refused before it is decoded. Symbolic links are followed, each
folder once: a link back to a folder above it (a cycle) is refused, and a file reached twice in one
class counts once (in two classes: refused, it cannot have two labels).

Images keep their channel count (1 for grey, 3 for RGB, 4 with alpha). A folder mixing counts
is read the way torchvision's ImageFolder reads every image, as RGB (grey repeated, alpha
dropped). Images of different sizes need --image-size N (a plain N x N antialiased resize, so a
non-square image is stretched, not cropped).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models.files import file_lock, fsync_dir, temporary_sibling
from models.serialization import manifest_digest
from tasks.data.dataset import DatasetRef, Located, SourceData, Splits, located_ref, resident_splits, resize
from tasks.data.spec import DatasetInputError, dataset_label, parse_dataset_spec

# torchvision.datasets.folder.IMG_EXTENSIONS, without importing torchvision to list files.
# docs/data.md promises GIF too (its first frame, as PIL reads it).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Decoded with PIL, which gives a palette GIF as RGB (or L); torchvision gives every frame.
PIL_ONLY = (".gif",)
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
    file costs a second per 70,000 files). Links are followed, each real folder once; a link to
    a folder above it would be walked forever (a cycle) and is refused."""
    found, walked = [], set()
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        for name in subdirs:
            target = os.path.realpath(os.path.join(directory, name))
            if real == target or real.startswith(target + os.sep):
                raise refuse(f"imagefolder:{root}: {os.path.relpath(os.path.join(directory, name), root)} links "
                             f"to a folder above it ({target}), a cycle: remove the link")
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")
                            and os.path.realpath(os.path.join(directory, d)) not in walked)
        walked.add(real)
        prefix = os.path.relpath(directory, root) + os.sep
        found += [prefix + name for name in sorted(names)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _once_each(root: Path, split: str, classes: list[list[str]]) -> list[list[str]]:
    """Each real file once per split: a second path to a file of the same class is dropped, a
    path to a file of another class refused (one image, two labels)."""
    owner: dict[tuple[int, int], tuple[str, int]] = {}
    kept = []
    for index, paths in enumerate(classes):
        kept.append([])
        for path in paths:
            stat = os.stat(os.path.join(root, path))
            first = owner.setdefault((stat.st_dev, stat.st_ino), (path, index))
            if first[1] != index:
                raise refuse(f"imagefolder:{root}: {path} and {first[0]} are the same file in two classes of {split}/")
            if first[0] == path:
                kept[-1].append(path)
    return kept


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
    if len(class_names) < 2:
        raise refuse(f"{where}: train/ holds a single class folder ({class_names[0]}): a classifier needs two "
                     "classes at least, or there is nothing to tell apart")
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
        per_class = _once_each(root, split, [_images_under(root / split / name, root) for name in class_names])
        entries = []
        for index, (name, images) in enumerate(zip(class_names, per_class)):
            if not images:
                raise refuse(f"{where}: {split}/{name}/ holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            entries += [(path, index) for path in images]
        files[split] = tuple(entries)
    return FolderScan(root, class_names, files)


def folder_fingerprint(scan: FolderScan) -> str:
    """Digest of every image file's relative path and SHA-256."""
    root = str(scan.root) + os.sep
    return manifest_digest({path: _sha256(root + path) for entries in scan.files.values() for path, _ in entries})


def _read_bytes(path: str) -> bytes:
    with open(path, "rb", buffering=0) as handle:  # an image file is read whole: one read, no buffer copy
        return handle.read()


def _sha256(path: str) -> str:
    return hashlib.sha256(_read_bytes(path)).hexdigest()


@dataclass(frozen=True)
class Decoding:
    """How every image of a folder is decoded: the size it is brought to, the pixel limit."""

    image_size: int | None
    max_pixels: int


def decode_image_bytes(data: bytes, name: str, decoding: Decoding) -> torch.Tensor:
    """One image file's bytes as uint8 (C, H, W), channels as stored, resized to the decoding's
    size. Its header is read first: an image over the pixel limit is refused before it is decoded
    (a decompression bomb). torchvision's decoders (PNG, JPEG, WebP) first; PIL for the rest
    (BMP, TIFF, PPM/PGM, GIF) and for what they refuse."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():  # PIL warns past its own limit; max_image_pixels decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError as error:  # past twice PIL's limit, whatever ours says
        raise _Refused(_Refusal("max_image_pixels", f"{name}: {error}")) from None
    if width * height > decoding.max_pixels:
        raise _Refused(_Refusal("max_image_pixels", f"{name} has {width}x{height} = {width * height:,} pixels, over "
                       f"max_image_pixels {decoding.max_pixels:,}: shrink it or raise max_image_pixels"))
    image = None
    if not name.lower().endswith(PIL_ONLY):
        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, ValueError):
            pass
    if image is None:
        image = _decode_with_pil(data)
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = (image.to(torch.int64) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)
    if image.ndim != 3 or 0 in image.shape:
        raise _Refused(_Refusal("dataset", f"{name} decodes to an image of shape {tuple(image.shape)} (channels, "
                                "height, width): it has no pixels or no channels"))
    return resize(image.unsqueeze(0), decoding.image_size)[0]


def _decode_with_pil(data: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        if opened.mode == "P" and _grey_palette(opened.getpalette() or []):  # a grey GIF stays grey
            opened = opened.convert("L")
        if opened.mode not in ("L", "LA", "RGB", "RGBA"):  # P (GIF), 1, CMYK, I;16...: as PIL converts them
            opened = opened.convert("RGBA" if "A" in opened.getbands() else "RGB")
        array = np.array(opened, dtype=np.uint8)
    return torch.from_numpy(array).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _grey_palette(palette: list[int]) -> bool:
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """An image with 1-4 channels as RGB, as PIL's convert('RGB') does for L, LA, RGB, RGBA."""
    channels = image.shape[0]
    return image[:1].expand(3, -1, -1) if channels <= 2 else image[:3]


@dataclass(frozen=True)
class _Refusal:
    """A file's refusal, sent back from a decoding worker as a value (field, message)."""

    field: str
    message: str


class _Refused(Exception):
    def __init__(self, refusal: _Refusal):
        super().__init__(refusal.message)
        self.refusal = refusal


def _decode_one(root: Path, path: str, decoding: Decoding) -> tuple[str, torch.Tensor | _Refusal]:
    """(SHA-256 of the bytes read, the image decoded from those very bytes, or why not)."""
    data = _read_bytes(os.path.join(root, path))
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, decode_image_bytes(data, path, decoding)
    except _Refused as refused:
        return digest, refused.refusal
    except Exception as error:  # any decoder's complaint about a broken file
        return digest, _Refusal("dataset", f"cannot read image {path}: "
                                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")


class _Decoder(torch.utils.data.Dataset):
    """The folder's files decoded in DataLoader worker processes (the decoders hold the GIL, so
    threads do not help)."""

    def __init__(self, root: Path, paths: list[str], decoding: Decoding):
        self.root, self.paths, self.decoding = root, paths, decoding

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return _decode_one(self.root, self.paths[index], self.decoding)


def _decoded(root: Path, paths: list[str], decoding: Decoding, num_workers: int):
    """(digest, image or refusal) of every file, in order: in `num_workers` processes for a
    folder of PARALLEL_FROM files or more, here otherwise."""
    if num_workers == 0 or len(paths) < PARALLEL_FROM:
        for path in paths:
            yield _decode_one(root, path, decoding)
        return
    loader = torch.utils.data.DataLoader(_Decoder(root, paths, decoding), batch_size=DECODE_BATCH,
                                         num_workers=num_workers, collate_fn=list)
    for batch in loader:
        yield from batch


def decode_files(root: Path, paths: list[str], decoding: Decoding, num_workers: int) -> tuple[list[torch.Tensor], str]:
    """Every file decoded (and resized) one by one, and the fingerprint of the bytes decoded.
    The first refused file is refused."""
    images, digests = [], {}
    for path, (digest, image) in zip(paths, _decoded(root, paths, decoding, num_workers)):
        if isinstance(image, _Refusal):
            raise refuse(f"imagefolder:{root}: {image.message}", field=image.field)
        digests[path] = digest
        images.append(image)
    return images, manifest_digest(digests)


def _stack(images: list[torch.Tensor], rgb: bool) -> torch.Tensor:
    """The images as one tensor, each list entry freed once copied (peak: the tensor, not twice it)."""
    first = as_rgb(images[0]) if rgb else images[0]
    stacked = torch.empty((len(images), *first.shape), dtype=torch.uint8)
    for index in range(len(images)):
        image, images[index] = images[index], None
        stacked[index] = as_rgb(image) if rgb else image
    return stacked


def _check_one_size(scan: FolderScan, decoded: dict[str, list[torch.Tensor]]) -> None:
    sizes = {}
    for split, images in decoded.items():
        for (path, _), image in zip(scan.files[split], images):
            sizes.setdefault(tuple(image.shape[1:]), path)
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({path})" for (h, w), path in list(sizes.items())[:3])
        raise refuse(f"imagefolder:{scan.root} has images of {len(sizes)} sizes ({shown}{', ...' if len(sizes) > 3 else ''}): "
                     "give image_size N to resize them all to N x N", field="image_size")


def decode_folder(scan: FolderScan, decoding: Decoding, num_workers: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """Every image decoded, brought to one channel count and size, stacked per split; and the
    fingerprint of the bytes decoded."""
    every, fingerprint = decode_files(scan.root, [path for entries in scan.files.values() for path, _ in entries],
                                      decoding, num_workers)
    decoded, start = {}, 0
    for split, entries in scan.files.items():  # one pass (one set of workers) for all splits
        decoded[split], start = every[start:start + len(entries)], start + len(entries)
    del every
    rgb = len({image.shape[0] for images in decoded.values() for image in images}) > 1
    _check_one_size(scan, decoded)
    tensors = {}
    for split, images in decoded.items():
        tensors[f"{split}_images"] = _stack(images, rgb)
        tensors[f"{split}_labels"] = torch.tensor([label for _, label in scan.files[split]], dtype=torch.int64)
    return tensors, fingerprint


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
    """The cache file written atomically under its folder's lock; a full disk is refused
    (exit 2, data_dir named) and leaves no partial file or folder behind."""
    created = [folder for folder in path.parents if not folder.exists()]  # innermost first
    try:
        with file_lock(path.parent, ".lock"):
            if _read_cache(path, scan) is not None:  # another process wrote it meanwhile: the same bytes'
                return
            tmp = temporary_sibling(path)
            try:
                _save(tmp, tensors, {"format": CACHE_FORMAT, "classes": json.dumps(list(scan.class_names))})
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(path.parent)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        (path.parent / ".lock").unlink(missing_ok=True)
        for folder in created:
            folder.rmdir()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        raise refuse(f"no space left on the device of {path.parent.parent.parent} for the decoded images "
                     f"({size / 1e6:.1f} MB): free some space or give another data_dir", field="data_dir") from None


SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int64: "I64"}


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format written tensor by tensor, every write checked: safetensors' own
    save_file holds no second copy either, but drops a write error (a full disk gave a cut
    file and no error)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            handle.write(memoryview(tensor.contiguous().numpy()).cast("B"))  # no copy
        handle.flush()
        os.fsync(handle.fileno())


# Images decoded by `prepare` and not yet written (nothing is written before every check of the
# run has passed): `store` or `splits` in this process write them instead of decoding again.
# One entry: the dataset being prepared.
_pending: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}


def cached_tensors(scan: FolderScan, fingerprint: str, data_dir: Path, decoding: Decoding, num_workers: int = 0,
                   write: bool = True) -> SourceData:
    """The folder's images as tasks.data.prepare.SourceData: from the cache, else decoded, and
    then written to the cache when `write` (else kept for `store`). The decoded bytes must be
    those of `fingerprint`: a file changed since it was fingerprinted is refused, so the cache
    never holds other images under its name."""
    path, key = cache_file(data_dir, fingerprint, decoding.image_size), (fingerprint, decoding.image_size)
    tensors = _pending.get(key) or _read_cache(path, scan)
    if tensors is None:
        tensors, decoded = decode_folder(scan, decoding, num_workers)  # refusals here, before anything is written
        if decoded != fingerprint:
            raise refuse(f"imagefolder:{scan.root}: its files changed while they were read (a copy or sync still "
                         "running?): run again once the folder is complete")
        _pending.clear()
        _pending[key] = tensors
    if write and key in _pending:
        _write_cache(path, tensors, scan)
        _pending.pop(key)
    val = "val_images" in tensors
    return SourceData(
        train_images=tensors["train_images"], train_labels=tensors["train_labels"],
        test_images=tensors["test_images"], test_labels=tensors["test_labels"], class_names=scan.class_names,
        val_images=tensors["val_images"] if val else None, val_labels=tensors["val_labels"] if val else None)


# --- the data-source protocol (tasks/data/dataset.py) ------------------------------------------

def prepare(spec: str, data_dir: Path, val_size: int | None, split_seed: int, train_limit: int | None,
            image_size: int | None, num_workers: int, allow_download: bool, max_image_pixels: int,
            write: bool = True) -> DatasetRef:
    scan = scan_folder(Path(parse_dataset_spec(spec).target))
    located = Located("imagefolder", dataset_label(spec), scan.root, folder_fingerprint(scan),
                      train_count=len(scan.files["train"]), val_folder="val" in scan.files)
    decoding = Decoding(image_size, max_image_pixels)
    ref = located_ref(spec, located, lambda: cached_tensors(scan, located.fingerprint, data_dir, decoding, num_workers,
                                                            write=False),
                      data_dir, val_size, split_seed, train_limit, image_size, num_workers)
    return dataclasses.replace(ref, max_image_pixels=max_image_pixels)


def store(ref: DatasetRef) -> None:
    """Write what `prepare` decoded for `ref` into the cache (once every check has passed)."""
    if (ref.fingerprint, ref.resize) in _pending:
        cached_tensors(scan_folder(Path(ref.root)), ref.fingerprint, Path(ref.data_dir), Decoding(ref.resize, ref.max_image_pixels))


def splits(ref: DatasetRef, device: torch.device) -> Splits:
    data = cached_tensors(scan_folder(Path(ref.root)), ref.fingerprint, Path(ref.data_dir or ref.root),
                          Decoding(ref.resize, ref.max_image_pixels), ref.num_workers)
    return resident_splits(ref, data, device)
