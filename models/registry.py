"""The model registry: one protocol, backends with W&B's artifact semantics.

Semantics shared by every backend (they are W&B's):
- a *collection* per dataset and architecture (e.g. ``fashion-mnist-cnn``);
- versions ``v0, v1, ...`` in the order they were logged; ``latest`` always names the newest;
- an alias names at most one version of a collection: giving it to a version takes it from the
  version that held it;
- every version carries a content digest and its metadata; fetching re-checks the digest and
  refuses a version whose files do not match it.

The ``local`` backend is a directory: writes go to a temporary directory that is fsynced and
renamed into place, so a reader never sees a half-written version, and every change of versions
or aliases happens under an exclusive file lock, so concurrent sweeps cannot both hold an alias.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from models.serialization import METADATA_FILE, WEIGHTS_FILE, digest_files, model_files, weights_from_bytes

VERSION_PATTERN = re.compile(r"^v(\d+)$")
MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"
PROMOTIONS_FILE = "promotions.jsonl"
LOCK_FILE = ".lock"


class RegistryError(Exception):
    """Base class of the registry's own errors."""


class ModelNotFound(RegistryError, LookupError):
    pass


class DigestMismatch(RegistryError):
    """A stored version's files do not match its digest: it is refused, never loaded."""


class AliasConflict(RegistryError):
    """The alias moved since the caller looked at it: its decision must be made again."""


# `expected_holder` default of move_alias: move whoever holds the alias now.
ANY_HOLDER = object()


@dataclass(frozen=True)
class ModelRef:
    """A reference to one stored version: what moves between tasks instead of weights."""

    collection: str
    version: str
    digest: str

    def __str__(self) -> str:
        return f"{self.collection}:{self.version}"


@dataclass
class StoredModel:
    ref: ModelRef
    state_dict: dict[str, torch.Tensor]
    metadata: dict
    aliases: list[str] = field(default_factory=list)


@dataclass
class VersionInfo:
    ref: ModelRef
    aliases: list[str]
    metadata: dict
    created_at: float


def split_name(name: str) -> tuple[str, str]:
    """'collection:vN' or 'collection:alias' -> (collection, 'vN' or alias)."""
    collection, sep, tag = name.partition(":")
    if not sep or not collection or not tag:
        raise ValueError(f"model name {name!r} must look like COLLECTION:vN or COLLECTION:ALIAS")
    return collection, tag


def check_expected_holder(collection: str, alias: str, holder_version: str | None,
                          expected_holder: ModelRef | None | object) -> None:
    """The compare of move_alias's compare-and-set, shared by every backend."""
    if expected_holder is ANY_HOLDER:
        return
    expected_version = expected_holder.version if expected_holder is not None else None
    if holder_version != expected_version:
        raise AliasConflict(f"'{alias}' of {collection} is held by {holder_version}, "
                            f"not {expected_version}, any more")


class ModelRegistry(Protocol):
    """What the tasks see of a registry; both backends implement it."""

    def log_model(self, collection: str, state_dict: dict[str, torch.Tensor], metadata: dict,
                  aliases: tuple[str, ...] = (), run=None) -> ModelRef:
        """Store a new version. `run`: the W&B run that trained it; a backend that stores models
        in W&B logs them as that run's output (lineage), the local one ignores it."""

    def fetch(self, ref: ModelRef | str) -> StoredModel: ...

    def resolve(self, collection: str, tag: str) -> ModelRef | None: ...

    def move_alias(self, ref: ModelRef, alias: str, reason: str = "",
                   expected_holder: ModelRef | None | object = ANY_HOLDER) -> ModelRef | None: ...

    def versions(self, collection: str) -> list[VersionInfo]: ...


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    _fsync_write(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class LocalRegistry:
    """A registry in a directory: ROOT/COLLECTION/vN/{model.safetensors, metadata.json, manifest.json}."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # --- paths and locking ------------------------------------------------------------------
    def _collection_dir(self, collection: str) -> Path:
        if not re.match(r"^[A-Za-z0-9_.\-]+$", collection):
            raise ValueError(f"collection name {collection!r}: letters, digits, '_', '.', '-' only")
        return self.root / collection

    @contextlib.contextmanager
    def _locked(self, collection: str) -> Iterator[Path]:
        directory = self._collection_dir(collection)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield directory
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_aliases(self, directory: Path) -> dict[str, str]:
        path = directory / ALIASES_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def _version_numbers(self, directory: Path) -> list[int]:
        if not directory.exists():
            return []
        numbers = [int(m.group(1)) for p in directory.iterdir() if (m := VERSION_PATTERN.match(p.name))]
        return sorted(numbers)

    # --- the protocol -------------------------------------------------------------------------
    def log_model(self, collection: str, state_dict: dict[str, torch.Tensor], metadata: dict,
                  aliases: tuple[str, ...] = (), run=None) -> ModelRef:
        files = model_files(state_dict, metadata)
        hashes, digest = digest_files(files)
        manifest = {"files": hashes, "digest": digest, "created_at": time.time()}
        with self._locked(collection) as directory:
            # Everything is written and fsynced in a temporary directory first; the rename that
            # gives it its version name is atomic, so `vN` is either complete or absent.
            staging = directory / f".staging-{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                for name, data in files.items():
                    _fsync_write(staging / name, data)
                _fsync_write(staging / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
                _fsync_dir(staging)
                numbers = self._version_numbers(directory)
                version = f"v{numbers[-1] + 1 if numbers else 0}"
                os.rename(staging, directory / version)
                _fsync_dir(directory)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            table = self._read_aliases(directory)
            for alias in ("latest", *aliases):
                table[alias] = version
            _atomic_write(directory / ALIASES_FILE, json.dumps(table, indent=2, sort_keys=True).encode())
        return ModelRef(collection, version, digest)

    def resolve(self, collection: str, tag: str) -> ModelRef | None:
        directory = self._collection_dir(collection)
        version = tag if VERSION_PATTERN.match(tag) else self._read_aliases(directory).get(tag)
        if version is None or not (directory / version / MANIFEST_FILE).exists():
            return None
        manifest = json.loads((directory / version / MANIFEST_FILE).read_text())
        return ModelRef(collection, version, manifest["digest"])

    def fetch(self, ref: ModelRef | str) -> StoredModel:
        if isinstance(ref, str):
            collection, tag = split_name(ref)
            resolved = self.resolve(collection, tag)
            if resolved is None:
                raise ModelNotFound(f"no model {ref!r} in registry {self.root}")
            ref = resolved
        directory = self._collection_dir(ref.collection) / ref.version
        if not (directory / MANIFEST_FILE).exists():
            raise ModelNotFound(f"no model {ref} in registry {self.root}")
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        contents = {name: (directory / name).read_bytes() for name in manifest["files"]}
        hashes, actual = digest_files(contents)
        if hashes != manifest["files"] or actual != manifest["digest"] or actual != ref.digest:
            raise DigestMismatch(
                f"{ref}: stored files have digest {actual}, expected {ref.digest}; refusing to load it"
            )
        aliases = sorted(a for a, v in self._read_aliases(directory.parent).items() if v == ref.version)
        return StoredModel(
            ref=ref,
            state_dict=weights_from_bytes(contents[WEIGHTS_FILE]),
            metadata=json.loads(contents[METADATA_FILE]),
            aliases=aliases,
        )

    def move_alias(self, ref: ModelRef, alias: str, reason: str = "",
                   expected_holder: ModelRef | None | object = ANY_HOLDER) -> ModelRef | None:
        """Give `alias` to `ref` (taking it from its holder); returns the previous holder.

        With `expected_holder` the move is a compare-and-set: if the alias is no longer held by
        that version (None: held by nobody), AliasConflict is raised and nothing changes, so a
        promotion decided against one holder never silently replaces another.
        """
        with self._locked(ref.collection) as directory:
            if not (directory / ref.version / MANIFEST_FILE).exists():
                raise ModelNotFound(f"no model {ref} in registry {self.root}")
            table = self._read_aliases(directory)
            previous_version = table.get(alias)
            check_expected_holder(ref.collection, alias, previous_version, expected_holder)
            table[alias] = ref.version
            _atomic_write(directory / ALIASES_FILE, json.dumps(table, indent=2, sort_keys=True).encode())
            record = {"time": time.time(), "alias": alias, "version": ref.version,
                      "previous": previous_version, "reason": reason}
            with open(directory / PROMOTIONS_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())
        if previous_version is None:
            return None
        return self.resolve(ref.collection, previous_version)

    def versions(self, collection: str) -> list[VersionInfo]:
        directory = self._collection_dir(collection)
        table = self._read_aliases(directory)
        infos = []
        for number in self._version_numbers(directory):
            version = f"v{number}"
            manifest = json.loads((directory / version / MANIFEST_FILE).read_text())
            metadata = json.loads((directory / version / METADATA_FILE).read_text())
            infos.append(VersionInfo(
                ref=ModelRef(collection, version, manifest["digest"]),
                aliases=sorted(a for a, v in table.items() if v == version),
                metadata=metadata,
                created_at=manifest["created_at"],
            ))
        return infos

    def collections(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))


def open_registry(backend: str, registry_dir: Path | str, **wandb_options) -> ModelRegistry:
    """The registry named by the config's `registry` field."""
    if backend == "local":
        return LocalRegistry(registry_dir)
    if backend == "wandb":
        from models.wandb_registry import WandbRegistry

        return WandbRegistry(**wandb_options)
    raise ValueError(f"unknown registry backend {backend!r}; allowed: local, wandb")
