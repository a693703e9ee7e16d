"""The `wandb` registry backend: models as W&B `model` artifacts, behind the ModelRegistry protocol.

W&B already has the semantics the protocol asks for: an artifact name is the collection
(``fashion-mnist-cnn``), versions are ``v0, v1, ...``, ``latest`` moves to the newest, and an alias
names at most one version of a collection (adding it to one version takes it from the other).
What W&B does not give us is OUR digest: its own artifact digest is an MD5 over its manifest, so
the SHA-256 manifest digest of models/serialization.py (the one the local backend computes) is
stored in the artifact's metadata and re-computed from the downloaded files before anything is
loaded. A model synced from an offline run carries the same key (tasks/training/train.py writes it), so
both paths are checked alike.

Logging is robust to the race of wandb/wandb#3843 and #4260: trials of one sweep commit versions
of the same collection at the same time and the server answers 409 to the loser. Commits from
one process are serialised by a per-collection lock (only the log-and-wait, not the training),
and a 409 from another process is retried with a fresh artifact after an exponential, jittered
back-off.

W&B has no compare-and-set on aliases: `expected_holder` is checked right before the move, which
narrows the window but cannot close it. That is why every alias move of a sweep happens in its one
compare step.

Needs a W&B server: offline runs cannot fetch artifacts (use the `local` backend there and
`lr-sweep publish` later).
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
import wandb
from wandb.errors import CommError

from models.names import VERSION_NAME, check_name
from models.registry import (
    ANY_HOLDER,
    DigestMismatch,
    ModelNotFound,
    ModelRef,
    RegistryError,
    StoredModel,
    VersionInfo,
    check_expected_holder,
    latest_metrics,
    require_digest,
    split_name,
)
from models.serialization import METADATA_FILE, WEIGHTS_FILE, digest_files, model_files, weights_from_bytes, write_files

ARTIFACT_TYPE = "model"
# Keys this backend adds to the model's own metadata in the artifact's metadata. `digest` is also
# what tasks/training/train.py writes into the artifact of an offline run, so synced models verify alike.
DIGEST_KEY = "digest"
FILES_KEY = "file_sha256"
PROMOTIONS_KEY = "promotions"
REGISTRY_KEYS = (DIGEST_KEY, FILES_KEY, PROMOTIONS_KEY, "registry_ref")
EXPECTED_FILES = frozenset({WEIGHTS_FILE, METADATA_FILE})

# Seconds the public API waits for one answer of the server (its credentials check included),
# so an unreachable server is an error within seconds, not a long silent hang.
API_TIMEOUT_SECONDS = 30
# Seconds one artifact commit (upload + commit) may take before it counts as failed.
COMMIT_TIMEOUT_SECONDS = 600
COMMIT_ATTEMPTS = 5
COMMIT_BACKOFF_SECONDS = 2.0

_commit_locks: dict[tuple, threading.Lock] = {}
_commit_locks_guard = threading.Lock()


def _commit_lock(key: tuple) -> threading.Lock:
    with _commit_locks_guard:
        return _commit_locks.setdefault(key, threading.Lock())


# wandb-core reports a refused commit as text only (`Artifact.wait()` raises
# ValueError(response.error_message)); a conflict is the HTTP status 409 as a word together with
# "conflict", never a "409" inside a number or an id (4096, ...409...).
CONFLICT_TEXT = re.compile(r"(\b409\b.*\bconflict)|(\bconflict\b.*\b409\b)", re.IGNORECASE | re.DOTALL)


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind a W&B error: CommError keeps the requests error in `.exc`."""
    for candidate in (error, getattr(error, "exc", None)):
        status = getattr(getattr(candidate, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def is_commit_conflict(error: BaseException) -> bool:
    """A 409 from the server: another commit took the version this one raced for; retrying with a
    fresh artifact fixes it. Anything else (auth, quota, a bad name, a 4xx/5xx that is not 409)
    is not retried: no retry can fix it."""
    status = http_status(error)
    if status is not None:
        return status == 409
    return isinstance(error, ValueError) and bool(CONFLICT_TEXT.search(str(error)))


def _is_not_found(error: CommError) -> bool:
    # The public API turns "project/artifact membership ... not found" into a CommError; a
    # network or authentication failure must not read as "no such model".
    return "not found" in str(error).lower()


def _timestamp(text: str | None) -> float:
    try:
        return datetime.fromisoformat(text).timestamp() if text else 0.0
    except ValueError:
        return 0.0


def model_artifact(collection: str, paths: dict[str, Path], metadata: dict) -> wandb.Artifact:
    """A `model` artifact of the collection holding the given files (copied to W&B's staging)."""
    artifact = wandb.Artifact(name=collection, type=ARTIFACT_TYPE, metadata=metadata)
    for name, path in paths.items():
        artifact.add_file(str(path), name=name)
    return artifact


def model_metadata_of(artifact_metadata: dict) -> dict:
    """The model's own metadata: the artifact's, less the keys the registry adds."""
    return {k: v for k, v in artifact_metadata.items() if k not in REGISTRY_KEYS}


class WandbRegistry:
    """Models as W&B artifacts of type `model` in ENTITY/PROJECT.

    `run`: a run to attribute fetches and links to (lineage: `run.use_artifact`,
    `run.link_artifact`); without one, the public API is used. `registry_collection`: a W&B
    Registry collection (e.g. ``wandb-registry-model/fashion-mnist-cnn``) where every alias move
    also links the new holder with that alias. `api`: a `wandb.Api` to use (tests pass one).
    """

    def __init__(self, project: str, entity: str | None = None, *, registry_collection: str | None = None,
                 run=None, api: wandb.Api | None = None, commit_attempts: int = COMMIT_ATTEMPTS,
                 backoff_seconds: float = COMMIT_BACKOFF_SECONDS):
        if not project:
            raise ValueError("WandbRegistry needs a W&B project")
        if commit_attempts < 1:
            raise ValueError(f"commit_attempts must be >= 1, got {commit_attempts}")
        self.project = project
        self.entity = entity
        self.registry_collection = registry_collection
        self.run = run
        self._api_instance = api
        self.commit_attempts = commit_attempts
        self.backoff_seconds = backoff_seconds

    # --- paths and the API --------------------------------------------------------------------
    def _api(self) -> wandb.Api:
        if self._api_instance is None:
            overrides = {"project": self.project} | ({"entity": self.entity} if self.entity else {})
            self._api_instance = wandb.Api(overrides=overrides, timeout=API_TIMEOUT_SECONDS)
        return self._api_instance

    @property
    def location(self) -> str:
        """'ENTITY/PROJECT' (or 'PROJECT' for the API key's default entity)."""
        return f"{self.entity}/{self.project}" if self.entity else self.project

    def _collection_path(self, collection: str) -> str:
        return f"{self.location}/{collection}"

    def artifact_name(self, collection: str, tag: str) -> str:
        """'ENTITY/PROJECT/COLLECTION:TAG', what `wandb.Api().artifact` takes."""
        return f"{self._collection_path(collection)}:{tag}"

    def _artifact(self, collection: str, tag: str, *, use: bool = False):
        """The artifact COLLECTION:TAG, or None; `use` records it as an input of `self.run`."""
        name = self.artifact_name(collection, tag)
        try:
            if use and self.run is not None:
                return self.run.use_artifact(name, type=ARTIFACT_TYPE)
            return self._api().artifact(name, type=ARTIFACT_TYPE)
        except CommError as error:
            if _is_not_found(error):
                return None
            raise

    def _ref_of(self, collection: str, artifact) -> ModelRef:
        return ModelRef(collection=collection, version=artifact.version,
                        digest=artifact.metadata.get(DIGEST_KEY, ""))

    # --- the protocol -------------------------------------------------------------------------
    def log_model(self, collection: str, state_dict: dict[str, torch.Tensor], metadata: dict,
                  aliases: tuple[str, ...] = (), run=None) -> ModelRef:
        """Log the model as an output of `run` (the trial's run: lineage), waiting for the commit.

        Without a run, a short run of job type `log-model` is started for it.
        """
        files = model_files(state_dict, metadata)
        hashes, digest = digest_files(files)
        artifact_metadata = metadata | {DIGEST_KEY: digest, FILES_KEY: hashes}
        if run is None:
            with wandb.init(project=self.project, entity=self.entity, job_type="log-model",
                            reinit="create_new",
                            settings=wandb.Settings(init_timeout=API_TIMEOUT_SECONDS, silent=True)) as own_run:
                return self.log_model(collection, state_dict, metadata, aliases, run=own_run)
        with tempfile.TemporaryDirectory(prefix="wandb-registry-") as staging:
            paths = write_files(files, Path(staging))
            logged = self._commit(run, collection, paths, artifact_metadata, list(aliases))
        return ModelRef(collection=collection, version=logged.version, digest=digest)

    def _commit(self, run, collection: str, paths: dict[str, Path], metadata: dict, aliases: list[str]):
        lock = _commit_lock((self.entity, self.project, collection))
        for attempt in range(1, self.commit_attempts + 1):
            # A fresh artifact per attempt: a draft whose commit was refused cannot be re-sent.
            # add_file copies each file into W&B's staging folder, which the upload reads.
            artifact = model_artifact(collection, paths, metadata)
            try:
                with lock:
                    logged = run.log_artifact(artifact, aliases=aliases)
                    logged.wait(timeout=COMMIT_TIMEOUT_SECONDS)
                return logged
            except (CommError, ValueError) as error:
                if not is_commit_conflict(error):
                    raise
                if attempt == self.commit_attempts:
                    raise RegistryError(
                        f"{collection}: W&B refused the commit {attempt} times with a conflict (409) "
                        f"while other runs committed versions of it; last answer: {error}") from error
            time.sleep(self.backoff_seconds * 2 ** (attempt - 1) * (1 + random.random()))
        raise AssertionError("unreachable")

    def resolve(self, collection: str, tag: str) -> ModelRef | None:
        artifact = self._artifact(collection, tag)
        return None if artifact is None else self._ref_of(collection, artifact)

    def fetch(self, ref: ModelRef | str) -> StoredModel:
        """Download a version and load it after its files matched the reference's digest (a name
        typed by a person is resolved first, and checked against the digest W&B records)."""
        if isinstance(ref, str):
            (collection, tag), expected = split_name(ref), None
        else:
            collection, tag, expected = ref.collection, ref.version, ref.digest
        artifact = self._artifact(collection, tag, use=True)
        if artifact is None:
            raise ModelNotFound(f"no model {collection}:{tag} in W&B project {self.location}")
        found = self._ref_of(collection, artifact)
        if not found.digest:
            raise DigestMismatch(f"{found}: the W&B artifact carries no '{DIGEST_KEY}' in its metadata; "
                                 "it was not logged by this registry and is refused")
        if expected is not None:
            require_digest(ref, found.digest, f"W&B project {self.location}")
        with tempfile.TemporaryDirectory(prefix="wandb-fetch-") as download_dir:
            # skip_cache: the bytes checked are the bytes downloaded, not a cached copy.
            root = Path(artifact.download(root=download_dir, skip_cache=True))
            contents = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        _, actual = digest_files(contents)
        if set(contents) != EXPECTED_FILES or actual != found.digest:
            raise DigestMismatch(
                f"{found}: downloaded files {sorted(contents)} have digest {actual}, expected "
                f"{expected or found.digest}; refusing to load it")
        return StoredModel(
            ref=found,
            state_dict=weights_from_bytes(contents[WEIGHTS_FILE]),
            metadata=json.loads(contents[METADATA_FILE]),
            aliases=sorted(artifact.aliases),
        )

    def move_alias(self, ref: ModelRef, alias: str, reason: str = "",
                   expected_holder: ModelRef | None | object = ANY_HOLDER,
                   metrics: dict | None = None) -> ModelRef | None:
        """Give `alias` to `ref` in W&B (and link it into the Registry collection, if one is named).

        Returns the previous holder. W&B moves an alias within a collection by itself; the old
        holder is checked afterwards and cleared if a server kept it there.
        """
        check_name("alias", alias)
        holder = self.resolve(ref.collection, alias)
        check_expected_holder(ref.collection, alias, holder.version if holder else None, expected_holder)
        target = self._artifact(ref.collection, ref.version)
        if target is None:
            raise ModelNotFound(f"no model {ref} in W&B project {self.location}")
        if target.metadata.get(DIGEST_KEY) != ref.digest:
            raise DigestMismatch(f"{ref}: W&B holds digest {target.metadata.get(DIGEST_KEY)} for this "
                                 f"version, not {ref.digest}; the alias is not moved")
        if alias not in target.aliases:
            record = {"time": time.time(), "alias": alias, "previous": holder.version if holder else None,
                      "reason": reason, "version": ref.version, "digest": ref.digest}
            if metrics is not None:
                record["metrics"] = metrics
            target.aliases = [*target.aliases, alias]
            target.metadata = target.metadata | {
                PROMOTIONS_KEY: [*target.metadata.get(PROMOTIONS_KEY, []), record]}
            target.save()
        if holder is not None and holder.version != ref.version:
            previous = self._artifact(ref.collection, holder.version)
            if previous is not None and alias in previous.aliases:
                previous.aliases = [a for a in previous.aliases if a != alias]
                previous.save()
        if self.registry_collection:
            if self.run is not None:
                self.run.link_artifact(target, self.registry_collection, aliases=[alias])
            else:
                target.link(self.registry_collection, aliases=[alias])
        return holder

    def recorded_metrics(self, ref: ModelRef) -> dict | None:
        artifact = self._artifact(ref.collection, ref.version)
        if artifact is None or artifact.metadata.get(DIGEST_KEY) != ref.digest:
            return None
        return latest_metrics(artifact.metadata.get(PROMOTIONS_KEY, []), ref)

    def versions(self, collection: str) -> list[VersionInfo]:
        api = self._api()
        if not api.artifact_collection_exists(self._collection_path(collection), type=ARTIFACT_TYPE):
            return []
        infos = [
            VersionInfo(ref=self._ref_of(collection, artifact),
                        aliases=sorted(a for a in artifact.aliases if not VERSION_NAME.fullmatch(a)),
                        metadata=model_metadata_of(artifact.metadata),
                        created_at=_timestamp(artifact.created_at))
            for artifact in api.artifacts(type_name=ARTIFACT_TYPE, name=self._collection_path(collection))
        ]
        return sorted(infos, key=lambda info: int(VERSION_NAME.fullmatch(info.ref.version).group(1)))

    def find_by_digest(self, collection: str, digest: str) -> ModelRef | None:
        """The newest version whose files have this digest (e.g. a model synced from an offline run)."""
        matches = [info.ref for info in self.versions(collection) if info.ref.digest == digest]
        return matches[-1] if matches else None
