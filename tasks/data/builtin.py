"""The built-in datasets (Fashion-MNIST, MNIST, KMNIST): found, verified and fingerprinted once.

Sources, in order:
1. the data directory, where torchvision keeps decompressed IDX files (DATA_DIR/FashionMNIST/raw);
2. the system's dataset directory (Debian's `dataset-fashion-mnist` installs the .gz files under
   /usr/share/datasets/fashion-mnist): their MD5s are checked against torchvision's and they are
   decompressed into the data directory, where torchvision looks;
3. torchvision's own download (needs internet; it checks the MD5s itself).

The fingerprint of a dataset is the digest of its four raw files' SHA-256s. It goes into every
model's metadata, so a model can always be traced to the exact bytes it was trained on. A
SHA256SUMS file written next to the raw files catches later corruption before any training.

A dry run (`write=False`) installs and writes nothing: installed files are verified as they
are; the system's archives are decompressed into a scratch folder outside the data directory,
read, and removed.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.files import atomic_write, file_digest, file_lock, temporary_sibling
from models.serialization import manifest_digest
from tasks.data.dataset import DatasetRef, Located, SourceData, Splits, located_ref, resident_splits, resize
from tasks.data.spec import DatasetError


@dataclass(frozen=True)
class DatasetFiles:
    """A dataset's published files: torchvision's folder name (so torchvision reads the same
    files) and the MD5 of each .gz archive, as torchvision's own tables list them. Kept here so
    that reading the data does not import torchvision (1.6 s and 190 MB of RSS, measured)."""

    folder: str
    archives: dict[str, str]


DATASET_FILES = {
    "fashion-mnist": DatasetFiles("FashionMNIST", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "mnist": DatasetFiles("MNIST", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "kmnist": DatasetFiles("KMNIST", {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134"}),
}


def torchvision_class(name: str):
    """torchvision's Dataset class of `name`: for its download, and for code that wants a
    torchvision Dataset (the benchmark's DataLoader baseline)."""
    from torchvision import datasets

    return getattr(datasets, DATASET_FILES[name].folder)
# Directories where an operating system package may have put the .gz files.
SYSTEM_DIRS = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
    "kmnist": [Path("/usr/share/datasets/kmnist")],
}
CHECKSUM_FILE = "SHA256SUMS"
# SHA-256 of the decompressed raw files, where we know them. Debian re-compresses the upstream
# .gz files, so their MD5s differ from torchvision's while the content is the same; these were
# computed from Debian's dataset-fashion-mnist (0.0~git20200523), the zalandoresearch release.
KNOWN_RAW_SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
TRAIN_SET_SIZE = 60000


def raw_file_names(name: str) -> list[str]:
    return [Path(archive).stem for archive in DATASET_FILES[name].archives]


def raw_dir(name: str, data_dir: Path) -> Path:
    return Path(data_dir) / DATASET_FILES[name].folder / "raw"


def _write_checksums(directory: Path, names: list[str]) -> dict[str, str]:
    hashes = {name: file_digest(directory / name) for name in names}
    atomic_write(directory / CHECKSUM_FILE, "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes)))
    return hashes


def _read_checksums(directory: Path) -> dict[str, str] | None:
    path = directory / CHECKSUM_FILE
    if not path.exists():
        return None
    pairs = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {name.strip(): digest for digest, name in pairs}


def _install_from_system(name: str, target: Path) -> bool:
    """Decompress an OS package's .gz files into `target`; False when none are installed.

    An archive is accepted when its MD5 is torchvision's or, decompressed, its SHA-256 is known.
    """
    expected_md5 = DATASET_FILES[name].archives
    known = KNOWN_RAW_SHA256.get(name, {})
    for source in SYSTEM_DIRS.get(name, []):
        archives = [source / gz for gz in expected_md5]
        if not all(path.exists() for path in archives):
            continue
        target.mkdir(parents=True, exist_ok=True)
        for archive in archives:
            # Decompress to a temporary name and rename, so an interrupted copy never looks done.
            tmp = temporary_sibling(target / archive.stem)
            with gzip.open(archive, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if file_digest(archive, "md5") != expected_md5[archive.name] and known.get(archive.stem) != file_digest(tmp):
                tmp.unlink()
                raise DatasetError(
                    f"{archive} is corrupt: neither its MD5 nor its decompressed SHA-256 matches "
                    f"the published {name} files; reinstall the package that provides it")
            os.replace(tmp, target / archive.stem)
        return True
    return False


def locate_dataset(name: str, data_dir: Path, allow_download: bool = True) -> tuple[Path, str]:
    """Make sure the raw files are in the data directory; returns (root, fingerprint)."""
    if name not in DATASET_FILES:
        raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_FILES)}")
    data_dir = Path(data_dir)
    directory = raw_dir(name, data_dir)
    names = raw_file_names(name)
    # Two sweeps (two containers on one fresh data volume) may install the files at once: the
    # first installs under the lock, the second then finds them and only verifies.
    with file_lock(data_dir, ".install.lock"):
        have_files = all((directory / n).exists() for n in names)
        if not have_files:
            installed = _install_from_system(name, directory)
            if not installed and allow_download:
                try:
                    torchvision_class(name)(str(data_dir), train=True, download=True)
                    torchvision_class(name)(str(data_dir), train=False, download=True)
                except Exception as error:  # no network, mirror down, ...
                    raise DatasetError(
                        f"dataset {name!r} not found in {directory} nor in "
                        f"{', '.join(map(str, SYSTEM_DIRS.get(name, [])))}, and torchvision's "
                        f"download failed: {error}"
                    ) from error
            elif not installed:
                raise DatasetError(f"dataset {name!r} not found in {directory} (download disabled)")
            hashes = _write_checksums(directory, names)
        else:
            hashes = {n: file_digest(directory / n) for n in names}
            recorded = KNOWN_RAW_SHA256.get(name) or _read_checksums(directory)
            if recorded is None:
                _write_checksums(directory, names)
            else:
                bad = [n for n in names if recorded.get(n) != hashes[n]]
                if bad:
                    raise DatasetError(
                        f"dataset files {', '.join(bad)} in {directory} do not match {CHECKSUM_FILE}: "
                        f"they are corrupt or were changed; delete {directory} to fetch them again"
                    )
    return data_dir, manifest_digest(hashes)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (what the MNIST family ships) as a uint8 tensor: a 4-byte
    magic (0, 0, 0x08, number of dimensions), each dimension as a big-endian int32, the data."""
    data = path.read_bytes()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path.name} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"{path.name} holds {len(body)} bytes of data, its header says {math.prod(dims)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def read_raw(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the training or the test files."""
    directory = raw_dir(name, root)
    prefix = "train" if train else "t10k"
    try:
        images = read_idx(directory / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte").long()
    except (OSError, ValueError, RuntimeError) as error:  # truncated or malformed IDX files
        raise DatasetError(f"cannot read dataset {name!r} from {directory}: {error}") from error
    return images, labels


# --- the data-source protocol (tasks/data/dataset.py) ------------------------------------------

def read(name: str, root: Path, image_size: int | None) -> SourceData:
    images, labels = read_raw(name, root, train=True)
    test_images, test_labels = read_raw(name, root, train=False)
    return SourceData(resize(images.unsqueeze(1), image_size), labels,
                      resize(test_images.unsqueeze(1), image_size), test_labels)


def _installed(name: str, data_dir: Path) -> bool:
    return all((raw_dir(name, data_dir) / n).exists() for n in raw_file_names(name))


def _verified(name: str, data_dir: Path) -> tuple[Path, str]:
    """Installed files checked against their known or recorded SHA-256s, nothing written."""
    directory = raw_dir(name, data_dir)
    hashes = {n: file_digest(directory / n) for n in raw_file_names(name)}
    recorded = KNOWN_RAW_SHA256.get(name) or _read_checksums(directory) or hashes
    bad = [n for n in hashes if recorded.get(n) != hashes[n]]
    if bad:
        raise DatasetError(f"dataset files {', '.join(bad)} in {directory} do not match {CHECKSUM_FILE}: "
                           f"they are corrupt or were changed; delete {directory} to fetch them again")
    return Path(data_dir), manifest_digest(hashes)


def prepare(spec: str, data_dir: Path, val_size: int | None, split_seed: int, train_limit: int | None,
            image_size: int | None, num_workers: int, allow_download: bool, max_image_pixels: int,
            write: bool = True) -> DatasetRef:
    if not write and _installed(spec, data_dir):
        root, fingerprint = _verified(spec, data_dir)
    elif not write:  # the system's archives, read from a scratch folder: the data directory stays as it is
        with tempfile.TemporaryDirectory(prefix="lr-sweep-dry-run-") as scratch:
            if not _install_from_system(spec, raw_dir(spec, Path(scratch))):
                raise DatasetError(f"dataset {spec!r} is not installed in {raw_dir(spec, data_dir)} and a dry run "
                                   "downloads nothing: run without --dry-run, or `lr-sweep data`, to fetch it")
            ref = prepare(spec, Path(scratch), val_size, split_seed, train_limit, image_size, num_workers,
                          False, max_image_pixels, write=False)
        return replace(ref, root=str(Path(data_dir).resolve()), data_dir=str(Path(data_dir).resolve()))
    else:
        root, fingerprint = locate_dataset(spec, data_dir, allow_download)
    located = Located("builtin", spec, Path(root).resolve(), fingerprint)
    return located_ref(spec, located, lambda: read(spec, located.root, image_size), data_dir, val_size, split_seed,
                       train_limit, image_size, num_workers)


def store(ref: DatasetRef) -> None:
    """Nothing to keep: the sources' own files are read as they are."""


def splits(ref: DatasetRef, device: torch.device) -> Splits:
    return resident_splits(ref, read(ref.name, Path(ref.root), ref.resize), device)
