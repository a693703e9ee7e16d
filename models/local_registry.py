"""The `local` registry backend: ROOT/COLLECTION/vN/{model.safetensors, metadata.json, manifest.json}.

Crash safety, change by change (every change happens under the collection's file lock):
- a new version is written and fsynced in a `.staging-*` folder, then renamed to `vN`: `vN` is
  complete or absent. A staging folder that a crashed writer left behind is removed by the next
  writer (only writers make them, and only under the lock, so any found there is dead);
- `latest` is not stored: it is the highest complete `vN`, so it cannot lag behind a crash
  between the rename and a table write;
- an alias move is first appended to `promotions.jsonl` (fsynced), then written to
  `aliases.json`. A crash in between leaves a move that was decided and logged but not applied;
  the next locked operation applies it (the log is the write-ahead log), so the log never lacks
  a move that happened and the table never lacks one that was logged. A torn line anywhere in
  the log (a full disk, a crash mid-append) is skipped, never read as the end of the log, and
  the next locked operation rewrites the log without it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from models.files import atomic_write, file_lock, fsync_dir, fsync_write
from models.names import LATEST, VERSION_NAME, check_name, inside
from models.registry import (
    ANY_HOLDER,
    CorruptState,
    ModelNotFound,
    ModelRef,
    StoredModel,
    VersionInfo,
    check_expected_holder,
    latest_metrics,
    require_digest,
    split_name,
)
from models.serialization import METADATA_FILE, WEIGHTS_FILE, digest_files, model_files, weights_from_bytes

MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"
PROMOTIONS_FILE = "promotions.jsonl"
STAGING_PREFIX = ".staging-"


def read_state(path: Path):
    """A JSON file the registry keeps; one that cannot be parsed is CorruptState naming it (a
    bare "Expecting ',' delimiter" says neither which file nor that it is stored state)."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptState(path, str(error)) from None


class LocalRegistry:
    """A registry in a directory, safe for several processes and threads at once."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    # --- paths, locking, recovery -----------------------------------------------------------
    def _collection_dir(self, collection: str) -> Path:
        return inside(self.root, check_name("collection", collection))

    def _version_dir(self, ref: ModelRef) -> Path:
        return inside(self._collection_dir(ref.collection), check_name("version", ref.version))

    def _locked(self, collection: str):
        return file_lock(self._collection_dir(collection))

    def _read_aliases(self, directory: Path) -> dict[str, str]:
        path = directory / ALIASES_FILE
        table = read_state(path) if path.exists() else {}
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise CorruptState(path, "not a table of alias -> version")
        return table

    def _write_aliases(self, directory: Path, table: dict[str, str]) -> None:
        atomic_write(directory / ALIASES_FILE, json.dumps(table, indent=2, sort_keys=True))

    def _promotion_lines(self, directory: Path) -> tuple[list[dict], bool]:
        """The log's records, and whether it holds a torn line (a write cut short: a full disk, a
        crash mid-append). A torn line is skipped wherever it is: what comes after it was
        appended later and is as valid as what comes before."""
        path = directory / PROMOTIONS_FILE
        if not path.exists():
            return [], False
        text = path.read_text(errors="replace")
        records, torn = [], bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn = True
                continue
            if isinstance(record, dict) and {"alias", "version", "previous"} <= record.keys():
                records.append(record)
            else:
                torn = True
        return records, torn

    def _promotions(self, directory: Path) -> list[dict]:
        return self._promotion_lines(directory)[0]

    def _repair_promotions(self, directory: Path) -> None:
        """Under the lock: rewrite the log without its torn lines, so that the next append starts
        on a line of its own (after a torn last line it would have been glued to it)."""
        records, torn = self._promotion_lines(directory)
        if torn:
            atomic_write(directory / PROMOTIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))

    def _recover(self, directory: Path) -> None:
        """Under the lock: remove dead staging folders, apply logged moves the table lacks."""
        for leftover in directory.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._repair_promotions(directory)
        last_move: dict[str, dict] = {}
        for record in self._promotions(directory):
            last_move[record["alias"]] = record
        table = self._read_aliases(directory)
        unapplied = {alias: record["version"] for alias, record in last_move.items()
                     if table.get(alias) == record["previous"] and table.get(alias) != record["version"]}
        if unapplied:
            self._write_aliases(directory, table | unapplied)

    def _version_numbers(self, directory: Path) -> list[int]:
        if not directory.exists():
            return []
        return sorted(int(m.group(1)) for p in directory.iterdir()
                      if (m := VERSION_NAME.fullmatch(p.name)) and (p / MANIFEST_FILE).exists())

    def _aliases_of(self, directory: Path, version: str) -> list[str]:
        numbers = self._version_numbers(directory)
        latest = [LATEST] if numbers and f"v{numbers[-1]}" == version else []
        return sorted([a for a, v in self._read_aliases(directory).items() if v == version] + latest)

    # --- the protocol -------------------------------------------------------------------------
    def log_model(self, collection: str, state_dict: dict[str, torch.Tensor], metadata: dict,
                  aliases: tuple[str, ...] = (), run=None) -> ModelRef:
        for alias in aliases:
            check_name("alias", alias)
        files = model_files(state_dict, metadata)
        hashes, digest = digest_files(files)
        manifest = {"files": hashes, "digest": digest, "created_at": time.time()}
        with self._locked(collection) as directory:
            self._recover(directory)
            staging = directory / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                for name, data in files.items():
                    fsync_write(staging / name, data)
                fsync_write(staging / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
                fsync_dir(staging)
                numbers = self._version_numbers(directory)
                version = f"v{numbers[-1] + 1 if numbers else 0}"
                staging.rename(directory / version)
                fsync_dir(directory)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if aliases:
                self._write_aliases(directory, self._read_aliases(directory) | dict.fromkeys(aliases, version))
        return ModelRef(collection=collection, version=version, digest=digest)

    def resolve(self, collection: str, tag: str) -> ModelRef | None:
        directory = self._collection_dir(collection)
        if tag == LATEST:
            numbers = self._version_numbers(directory)
            version = f"v{numbers[-1]}" if numbers else None
        elif VERSION_NAME.fullmatch(tag):
            version = tag
        else:
            version = self._read_aliases(directory).get(check_name("alias", tag))
        if version is None or not (directory / version / MANIFEST_FILE).exists():
            return None
        manifest = read_state(directory / version / MANIFEST_FILE)
        return ModelRef(collection=collection, version=version, digest=manifest["digest"])

    def find_by_digest(self, collection: str, digest: str) -> ModelRef | None:
        matches = [info.ref for info in self.versions(collection) if info.ref.digest == digest]
        return matches[-1] if matches else None

    def fetch(self, ref: ModelRef | str) -> StoredModel:
        """The model `ref` names, checked against ref.digest. A name (`collection:vN` or
        `collection:alias`, typed by a person) is resolved first and checked against the digest
        its manifest records."""
        if isinstance(ref, str):
            resolved = self.resolve(*split_name(ref))
            if resolved is None:
                raise ModelNotFound(f"no model {ref!r} in registry {self.root}")
            ref = resolved
        directory = self._version_dir(ref)
        if not (directory / MANIFEST_FILE).exists():
            raise ModelNotFound(f"no model {ref} in registry {self.root} (for trials on several nodes "
                                "the registry must be shared by all of them)")
        manifest = read_state(directory / MANIFEST_FILE)
        require_digest(ref, manifest["digest"], f"registry {self.root}")
        contents = {name: (directory / name).read_bytes() for name in manifest["files"]}
        hashes, actual = digest_files(contents)
        if hashes != manifest["files"] or actual != manifest["digest"]:
            require_digest(ref, actual, f"registry {self.root} (its files changed since they were stored)")
        return StoredModel(
            ref=ref,
            state_dict=weights_from_bytes(contents[WEIGHTS_FILE]),
            metadata=json.loads(contents[METADATA_FILE]),
            aliases=self._aliases_of(directory.parent, ref.version),
        )

    def move_alias(self, ref: ModelRef, alias: str, reason: str = "",
                   expected_holder: ModelRef | None | object = ANY_HOLDER,
                   metrics: dict | None = None) -> ModelRef | None:
        """Give `alias` to `ref` (taking it from its holder); returns the previous holder.

        The alias must name a stored version with ref's digest. With `expected_holder` the move is
        a compare-and-set: if the alias is no longer held by that version (None: by nobody),
        AliasConflict is raised and nothing changes, so a promotion decided against one holder
        never silently replaces another.
        """
        check_name("alias", alias)
        with self._locked(ref.collection) as directory:
            self._recover(directory)
            current = self.resolve(ref.collection, ref.version)
            if current is None:
                raise ModelNotFound(f"no model {ref} in registry {self.root}")
            require_digest(ref, current.digest, f"registry {self.root}")
            table = self._read_aliases(directory)
            previous_version = table.get(alias)
            check_expected_holder(ref.collection, alias, previous_version, expected_holder)
            record = {"time": time.time(), "alias": alias, "version": ref.version, "digest": ref.digest,
                      "previous": previous_version, "reason": reason}
            if metrics is not None:
                record["metrics"] = metrics
            with open(directory / PROMOTIONS_FILE, "a") as log:  # the log first: see the module doc
                log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())
            self._write_aliases(directory, table | {alias: ref.version})
        return None if previous_version is None else self.resolve(ref.collection, previous_version)

    def recorded_metrics(self, ref: ModelRef) -> dict | None:
        records = self._promotions(self._collection_dir(ref.collection))
        return latest_metrics(records, ref)

    def versions(self, collection: str) -> list[VersionInfo]:
        directory = self._collection_dir(collection)
        infos = []
        for number in self._version_numbers(directory):
            version = f"v{number}"
            manifest = read_state(directory / version / MANIFEST_FILE)
            metadata = read_state(directory / version / METADATA_FILE)
            infos.append(VersionInfo(
                ref=ModelRef(collection=collection, version=version, digest=manifest["digest"]),
                aliases=self._aliases_of(directory, version), metadata=metadata,
                created_at=manifest["created_at"],
            ))
        return infos

    def collections(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
