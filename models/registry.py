"""The model registry protocol: what moves between tasks instead of weights.

Semantics shared by every backend (they are W&B's):
- a *collection* per dataset and architecture (e.g. ``fashion-mnist-cnn``);
- versions ``v0, v1, ...`` in the order they were logged; ``latest`` always names the newest;
- an alias names at most one version of a collection: giving it to a version takes it from the
  version that held it;
- every version carries a content digest and its metadata; fetching re-checks the digest and
  refuses a version whose files do not match it.

A model is its digest: a `ModelRef` names the collection and version AND the digest the trial
recorded, and every backend refuses to hand out a version whose digest is not the reference's.
So a name that means another model on another node (two `v0`s) can never be evaluated or
promoted in its place. Backends: `models/local_registry.py` (a directory) and
`models/wandb_registry.py` (W&B artifacts); `models/backends.py` opens the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict

from models.errors import (  # noqa: F401 (the registry's errors, re-exported where they always were)
    AliasConflict,
    CorruptState,
    DigestMismatch,
    ModelNotFound,
    RegistryError,
)
from models.names import LATEST, VERSION_NAME, NameNotAllowed, check_name

# `expected_holder` default of move_alias: move whoever holds the alias now.
ANY_HOLDER = object()


class ModelRef(BaseModel):
    """One stored model: collection, version and the content digest it was stored with."""

    model_config = ConfigDict(frozen=True)

    collection: str
    version: str
    digest: str

    def __str__(self) -> str:
        return f"{self.collection}:{self.version}"

    @property
    def short(self) -> str:
        """`collection:vN@digest12`, for logs and reports."""
        return f"{self}@{self.digest[:12]}"


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
    """'collection:vN' or 'collection:alias' -> (collection, 'vN' or alias), both names checked."""
    collection, sep, tag = name.partition(":")
    if not sep:
        raise NameNotAllowed("model", f"model name {name!r} must look like COLLECTION:vN or COLLECTION:ALIAS")
    check_name("collection", collection)
    if tag != LATEST and not VERSION_NAME.fullmatch(tag):
        check_name("alias", tag)
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


def require_digest(ref: ModelRef, found_digest: str, where: str) -> None:
    """The check every backend makes before it loads or promotes what `ref` names."""
    if found_digest != ref.digest:
        raise DigestMismatch(
            f"{ref} in {where} has digest {found_digest[:12] or '(none)'}…, not the {ref.digest[:12]}… "
            "the trial recorded: another model holds that name there (for trials on several nodes "
            "the registry must be shared by all of them: registry_dir on shared storage, or "
            "registry='wandb'); refusing to use it")


def latest_metrics(records: list[dict], ref: ModelRef) -> dict | None:
    """The metrics of the last promotion record that moved an alias to `ref` with metrics."""
    for record in reversed(records):
        if record.get("version") == ref.version and record.get("digest", ref.digest) == ref.digest \
                and isinstance(record.get("metrics"), dict):
            return record["metrics"]
    return None


class ModelRegistry(Protocol):
    """What the tasks see of a registry; both backends implement it."""

    def log_model(self, collection: str, state_dict: dict[str, torch.Tensor], metadata: dict,
                  aliases: tuple[str, ...] = (), run=None) -> ModelRef:
        """Store a new version. `run`: the W&B run that trained it; a backend that stores models
        in W&B logs them as that run's output (lineage), the local one ignores it."""

    def fetch(self, ref: ModelRef) -> StoredModel:
        """The model `ref` names, refused (DigestMismatch) unless its files have ref.digest."""

    def resolve(self, collection: str, tag: str) -> ModelRef | None: ...

    def find_by_digest(self, collection: str, digest: str) -> ModelRef | None: ...

    def move_alias(self, ref: ModelRef, alias: str, reason: str = "",
                   expected_holder: ModelRef | None | object = ANY_HOLDER,
                   metrics: dict | None = None) -> ModelRef | None:
        """`metrics`: what the gate measured `ref` at (its Evaluation), kept with the move so a
        later gate that cannot rebuild the holder (its code changed) compares on them."""

    def recorded_metrics(self, ref: ModelRef) -> dict | None:
        """The metrics the latest move of an alias to `ref` recorded, None if none did."""

    def versions(self, collection: str) -> list[VersionInfo]: ...
