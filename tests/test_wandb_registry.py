"""The `wandb` registry backend and `lr-sweep publish`.

No W&B server can run here, so the online calls go to `unittest.mock.create_autospec` of the real
`wandb.Api`, `wandb.Artifact` and `wandb.sdk.wandb_run.Run`: a call with a wrong name or signature
fails the test, so drift of the SDK's API shows up here. `FakeServer` answers those calls with
W&B's semantics (versions, aliases unique within a collection), keeping the state a real server
keeps. The files come from models/serialization.py, as the real backend writes them, so the
digest checks run on real bytes. The publish tests run a real (small) offline sweep and read
back what the real SDK recorded.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import requests
import torch
import wandb
from wandb.errors import CommError
from wandb.sdk.wandb_run import Run

from models.registry import AliasConflict, DigestMismatch, ModelNotFound, ModelRef, RegistryError
from models.serialization import WEIGHTS_FILE, model_files, sha256_hex
from models.wandb_registry import DIGEST_KEY, FILES_KEY, PROMOTIONS_KEY, WandbRegistry, is_commit_conflict
from tests.wandb_fakes import COLLECTION, PATH, FakeServer, digest_of, small_model

# --- fetch and the digest check ----------------------------------------------------------------

def test_fetch_by_alias_downloads_checks_and_loads():
    server = FakeServer()
    server.add_model(0)
    ref = server.add_model(1, aliases=["production"])
    server.add_model(2)
    stored = WandbRegistry("proj", "ent", api=server.api).fetch(f"{COLLECTION}:production")
    server.api.artifact.assert_called_with(f"{PATH}:production", type="model")
    assert stored.ref == ref and stored.aliases == ["production"]
    state, metadata = small_model(1)
    assert stored.metadata == metadata  # metadata.json, without the registry's own keys
    assert all(torch.equal(stored.state_dict[k], state[k]) for k in state)


def test_fetch_by_reference_and_resolve_agree():
    server = FakeServer()
    ref = server.add_model(3)
    registry = WandbRegistry("proj", "ent", api=server.api)
    assert registry.resolve(COLLECTION, "latest") == ref
    assert registry.fetch(ref).ref == ref
    assert registry.fetch(f"{COLLECTION}:{ref.version}").ref == ref


def test_a_downloaded_file_that_does_not_match_the_digest_is_refused():
    server = FakeServer()
    ref = server.add_model(0)
    files = server.versions[0]["files"]
    weights = bytearray(files[WEIGHTS_FILE])
    weights[-1] ^= 0xFF  # one flipped bit in the stored weights
    files[WEIGHTS_FILE] = bytes(weights)
    registry = WandbRegistry("proj", "ent", api=server.api)
    with pytest.raises(DigestMismatch, match="refusing to load"):
        registry.fetch(ref)
    with pytest.raises(DigestMismatch):
        registry.fetch(f"{COLLECTION}:latest")


def test_a_reference_whose_digest_differs_from_the_stored_one_is_refused():
    server = FakeServer()
    ref = server.add_model(0)
    registry = WandbRegistry("proj", "ent", api=server.api)
    with pytest.raises(DigestMismatch):
        registry.fetch(ModelRef(collection=COLLECTION, version=ref.version, digest="0" * 64))


def test_an_artifact_without_a_recorded_digest_is_refused():
    server = FakeServer()
    state, metadata = small_model(0)
    server.add(model_files(state, metadata), metadata)  # logged by someone else: no digest key
    with pytest.raises(DigestMismatch, match="carries no 'digest'"):
        WandbRegistry("proj", "ent", api=server.api).fetch(f"{COLLECTION}:v0")


def test_a_missing_model_is_not_found_but_other_errors_are_raised():
    server = FakeServer()
    registry = WandbRegistry("proj", "ent", api=server.api)
    assert registry.resolve(COLLECTION, "production") is None
    with pytest.raises(ModelNotFound):
        registry.fetch(f"{COLLECTION}:production")
    server.api.artifact.side_effect = CommError("Failed to verify credentials with https://example")
    with pytest.raises(CommError):
        registry.resolve(COLLECTION, "production")  # no answer is not "no such model"


def test_fetch_inside_a_run_records_lineage():
    server = FakeServer()
    ref = server.add_model(0)
    run = mock.create_autospec(Run, instance=True)
    run.use_artifact.side_effect = lambda name, type=None, aliases=None, use_as=None: server.artifact(name, type)
    WandbRegistry("proj", "ent", api=server.api, run=run).fetch(ref)
    run.use_artifact.assert_called_once_with(f"{PATH}:{ref.version}", type="model")


def test_versions_lists_refs_aliases_and_model_metadata():
    server = FakeServer()
    registry = WandbRegistry("proj", "ent", api=server.api)
    assert registry.versions(COLLECTION) == []
    refs = [server.add_model(seed) for seed in range(3)]
    infos = registry.versions(COLLECTION)
    assert [i.ref for i in infos] == refs
    assert infos[2].aliases == ["latest"]
    assert infos[1].metadata == small_model(1)[1]  # the digest key is the registry's, not the model's
    assert registry.find_by_digest(COLLECTION, refs[1].digest) == refs[1]


# --- alias moves and the Registry link ------------------------------------------------------------

@pytest.mark.parametrize("server_moves_aliases", [True, False], ids=["server-moves", "server-keeps"])
def test_moving_an_alias_takes_it_from_the_old_holder(server_moves_aliases):
    server = FakeServer(moves_aliases=server_moves_aliases)
    old = server.add_model(0, aliases=["production"])
    new = server.add_model(1)
    registry = WandbRegistry("proj", "ent", api=server.api)
    previous = registry.move_alias(new, "production", reason="better", expected_holder=old)
    assert previous == old
    assert server.holders("production") == [new.version]
    assert registry.resolve(COLLECTION, "production") == new
    record = server.versions[1]["metadata"][PROMOTIONS_KEY][-1]
    assert record["alias"] == "production" and record["previous"] == "v0" and record["reason"] == "better"
    assert registry.versions(COLLECTION)[0].aliases == []


def test_an_alias_that_moved_meanwhile_is_not_taken():
    server = FakeServer()
    server.add_model(0, aliases=["production"])
    other = server.add_model(1)
    candidate = server.add_model(2)
    registry = WandbRegistry("proj", "ent", api=server.api)
    registry.move_alias(other, "production")  # another sweep promoted meanwhile
    with pytest.raises(AliasConflict):
        registry.move_alias(candidate, "production", expected_holder=ModelRef(collection=COLLECTION, version="v0", digest="x"))
    assert server.holders("production") == [other.version]


def test_a_move_to_a_version_with_another_digest_is_refused():
    server = FakeServer()
    ref = server.add_model(0)
    with pytest.raises(DigestMismatch):
        WandbRegistry("proj", "ent", api=server.api).move_alias(ModelRef(collection=COLLECTION, version=ref.version, digest="f" * 64),
                                                               "production")
    assert server.holders("production") == []


def test_the_promoted_model_is_linked_into_the_registry_collection_with_the_alias():
    server = FakeServer()
    ref = server.add_model(0)
    target = "wandb-registry-model/fashion-mnist-cnn"
    views = []

    def artifact(name, type=None):
        views.append(server.artifact(name, type))
        return views[-1]

    server.api.artifact.side_effect = artifact
    WandbRegistry("proj", "ent", api=server.api, registry_collection=target).move_alias(ref, "production")
    linked = [view for view in views if view.link.called]
    assert len(linked) == 1 and linked[0].version == ref.version
    linked[0].link.assert_called_once_with(target, aliases=["production"])


def test_inside_a_run_the_link_goes_through_the_run():
    server = FakeServer()
    ref = server.add_model(0)
    run = mock.create_autospec(Run, instance=True)
    target = "wandb-registry-model/fashion-mnist-cnn"
    WandbRegistry("proj", "ent", api=server.api, run=run, registry_collection=target).move_alias(ref, "production")
    run.link_artifact.assert_called_once()
    artifact, path = run.link_artifact.call_args.args
    assert artifact.version == ref.version and path == target
    assert run.link_artifact.call_args.kwargs == {"aliases": ["production"]}


def test_without_a_registry_collection_nothing_is_linked():
    server = FakeServer()
    ref = server.add_model(0)
    run = mock.create_autospec(Run, instance=True)
    WandbRegistry("proj", "ent", api=server.api, run=run).move_alias(ref, "production")
    run.link_artifact.assert_not_called()


# --- logging: lineage, the digest in the metadata, 409 retries --------------------------------------

def logging_run(outcomes: list, versions=None):
    """An autospec'd Run whose log_artifact returns a logged artifact; each `outcomes` item is the
    exception its wait() raises (or None: committed)."""
    run = mock.create_autospec(Run, instance=True)
    sent = []
    numbers = iter(versions or range(100))

    def log_artifact(artifact_or_path, name=None, type=None, aliases=None, tags=None):
        sent.append((artifact_or_path, aliases))
        logged = mock.create_autospec(wandb.Artifact, instance=True)
        outcome = outcomes.pop(0) if outcomes else None
        logged.wait.side_effect = outcome
        logged.version = f"v{next(numbers)}"
        return logged

    run.log_artifact.side_effect = log_artifact
    return run, sent


def test_log_model_logs_one_model_artifact_through_the_trial_run():
    run, sent = logging_run([None], versions=[7])
    state, metadata = small_model(0)
    aliases = ("lr-0.001-seed-0", "sweep-s1")
    ref = WandbRegistry("proj", "ent").log_model(COLLECTION, state, metadata, aliases, run=run)
    files = model_files(state, metadata)
    assert ref == ModelRef(collection=COLLECTION, version="v7", digest=digest_of(files))
    [(artifact, sent_aliases)] = sent
    assert isinstance(artifact, wandb.Artifact)  # the real SDK class, built by the backend
    assert (artifact.name, artifact.type) == (COLLECTION, "model")
    assert sent_aliases == list(aliases)
    assert artifact.metadata[DIGEST_KEY] == ref.digest
    assert artifact.metadata[FILES_KEY] == {name: sha256_hex(data) for name, data in files.items()}
    assert artifact.metadata["trial_key"] == "key-0"
    assert sorted(artifact.manifest.entries) == ["metadata.json", "model.safetensors"]
    for name, data in files.items():  # the staged copies W&B uploads are the bytes that were hashed
        assert Path(artifact.manifest.entries[name].local_path).read_bytes() == data


def test_a_409_conflict_on_commit_is_retried_with_a_fresh_artifact():
    conflict = ValueError("commitArtifact: 409 Conflict: version index taken by a concurrent commit")
    run, sent = logging_run([conflict, conflict, None], versions=[3, 4, 5])
    state, metadata = small_model(0)
    ref = WandbRegistry("proj", "ent", backoff_seconds=0).log_model(COLLECTION, state, metadata, run=run)
    assert ref.version == "v5" and len(sent) == 3
    assert len({id(artifact) for artifact, _ in sent}) == 3  # a refused draft is never re-sent


def test_conflicts_that_do_not_end_raise_a_registry_error():
    run, sent = logging_run([ValueError("409 Conflict")] * 3)
    state, metadata = small_model(0)
    with pytest.raises(RegistryError, match="conflict"):
        WandbRegistry("proj", "ent", commit_attempts=3, backoff_seconds=0).log_model(
            COLLECTION, state, metadata, run=run)
    assert len(sent) == 3


def test_other_commit_errors_are_not_retried():
    run, sent = logging_run([ValueError("storage quota exceeded")])
    state, metadata = small_model(0)
    with pytest.raises(ValueError, match="quota"):
        WandbRegistry("proj", "ent", backoff_seconds=0).log_model(COLLECTION, state, metadata, run=run)
    assert len(sent) == 1


def test_a_409_from_the_public_api_is_recognised():
    response = mock.Mock(status_code=409)
    assert is_commit_conflict(CommError("HTTP error", exc=mock.Mock(response=response)))
    assert not is_commit_conflict(CommError("HTTP 500", exc=mock.Mock(response=mock.Mock(status_code=500))))


def http_error(status: int, text: str) -> CommError:
    """What wandb's public API raises: a CommError carrying the requests HTTPError."""
    response = requests.Response()
    response.status_code = status
    return CommError(text, exc=requests.HTTPError(text, response=response))


@pytest.mark.parametrize("error, conflict", [
    (http_error(409, "Conflict"), True),
    (http_error(403, "permission denied: conflict with org policy"), False),  # the status decides
    (http_error(500, "upload of 409 bytes failed"), False),
    (ValueError("commitArtifact: 409 Conflict: version index taken"), True),  # wandb-core's text
    (ValueError("upload of 4096 bytes failed: connection reset"), False),  # "409" in "4096"
    (ValueError("artifact id QXJ0aWZhY3Q6NDA5Ng409x refused: quota exceeded"), False),
    (ValueError("version conflict"), False),  # no status at all: not a 409
])
def test_only_a_real_409_is_a_conflict(error, conflict):
    assert is_commit_conflict(error) is conflict


def test_a_4096_error_is_not_retried():
    run, sent = logging_run([ValueError("upload of 4096 bytes failed")])
    state, metadata = small_model(0)
    with pytest.raises(ValueError, match="4096"):
        WandbRegistry("proj", "ent", backoff_seconds=0).log_model(COLLECTION, state, metadata, run=run)
    assert len(sent) == 1


def test_commits_of_one_collection_from_threads_do_not_overlap():
    in_flight, overlaps = [0], []
    run, _ = logging_run([])
    log_artifact = run.log_artifact.side_effect

    def slow_log_artifact(*args, **kwargs):
        logged = log_artifact(*args, **kwargs)

        def wait(timeout=None):
            in_flight[0] += 1
            overlaps.append(in_flight[0])
            time.sleep(0.05)
            in_flight[0] -= 1
            return logged
        logged.wait.side_effect = wait
        return logged

    run.log_artifact.side_effect = slow_log_artifact
    registry = WandbRegistry("proj", "ent")
    threads = [threading.Thread(target=registry.log_model, args=(COLLECTION, *small_model(seed)),
                                kwargs={"run": run}) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 4 and max(overlaps) == 1


