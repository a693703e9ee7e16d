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

import json
import shutil
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import wandb
from wandb.errors import CommError
from wandb.sdk.wandb_run import Run

import requests

from models.cnn import architecture, build_model
from models.local_registry import LocalRegistry
from models.registry import AliasConflict, DigestMismatch, ModelNotFound, ModelRef, RegistryError
from models.serialization import WEIGHTS_FILE, manifest_digest, model_files, sha256_hex
from models.wandb_registry import DIGEST_KEY, FILES_KEY, PROMOTIONS_KEY, WandbRegistry, is_commit_conflict

from tests.helpers import COLLECTION as SWEEP_COLLECTION  # noqa: E402 - the smoke sweep's collection

COLLECTION = "fashion-mnist-cnn"
PATH = f"ent/proj/{COLLECTION}"


def small_model(seed: int):
    torch.manual_seed(seed)
    arch = architecture(hidden_units=8)
    return build_model(arch).state_dict(), {"architecture": arch, "seed": seed, "trial_key": f"key-{seed}"}


def digest_of(files: dict[str, bytes]) -> str:
    return manifest_digest({name: sha256_hex(data) for name, data in files.items()})


class FakeServer:
    """What a W&B server keeps for one collection, served through autospec'd SDK objects."""

    def __init__(self, moves_aliases: bool = True, collection: str = COLLECTION):
        self.collection = collection
        self.versions: list[dict] = []  # {"files", "metadata", "aliases"}
        # A real server takes an alias from its holder when another version gets it; the other
        # mode checks that the backend clears the old holder itself when a server does not.
        self.moves_aliases = moves_aliases
        self.api = mock.create_autospec(wandb.Api, instance=True)
        self.api.artifact.side_effect = self.artifact
        self.api.artifact_collection_exists.side_effect = lambda name, type: bool(self.versions)
        self.api.artifacts.side_effect = lambda type_name, name, **_: [
            self._view(n) for n in range(len(self.versions))]

    def add(self, files: dict[str, bytes], metadata: dict, aliases=()) -> str:
        self.versions.append({"files": files, "metadata": metadata, "aliases": []})
        self._give(len(self.versions) - 1, ["latest", *aliases])
        return f"v{len(self.versions) - 1}"

    def add_model(self, seed: int, aliases=()) -> ModelRef:
        files = model_files(*small_model(seed))
        digest = digest_of(files)
        version = self.add(files, json.loads(files["metadata.json"]) | {DIGEST_KEY: digest}, aliases)
        return ModelRef(collection=self.collection, version=version, digest=digest)

    def _give(self, number: int, aliases) -> None:
        for alias in aliases:
            if self.moves_aliases or alias == "latest":
                for other in self.versions:
                    if alias in other["aliases"]:
                        other["aliases"].remove(alias)
            if alias not in self.versions[number]["aliases"]:
                self.versions[number]["aliases"].append(alias)

    def holders(self, alias: str) -> list[str]:
        return [f"v{n}" for n, v in enumerate(self.versions) if alias in v["aliases"]]

    def artifact(self, name: str, type: str | None = None):
        collection_path, _, tag = name.rpartition(":")
        assert collection_path == f"ent/proj/{self.collection}" and type == "model"
        for number, stored in enumerate(self.versions):
            if tag == f"v{number}" or tag in stored["aliases"]:
                return self._view(number)
        raise CommError(f"artifact membership '{self.collection}:{tag}' not found in 'ent/proj'")

    def _view(self, number: int):
        """A fresh client-side Artifact of version `number`, as the API returns one."""
        stored = self.versions[number]
        artifact = mock.create_autospec(wandb.Artifact, instance=True)
        artifact.version = f"v{number}"
        artifact.aliases = list(stored["aliases"])
        artifact.metadata = dict(stored["metadata"])
        artifact.created_at = f"2026-01-01T00:00:{number:02d}Z"
        saved_aliases = list(stored["aliases"])

        def save(project=None, settings=None):
            removed = [a for a in saved_aliases if a not in artifact.aliases]
            stored["aliases"] = [a for a in stored["aliases"] if a not in removed]
            self._give(number, [a for a in artifact.aliases if a not in saved_aliases])
            stored["metadata"] = dict(artifact.metadata)

        def download(root=None, allow_missing_references=False, skip_cache=None, path_prefix=None,
                     multipart=None):
            for file_name, data in stored["files"].items():
                (Path(root) / file_name).write_bytes(data)
            return root

        artifact.save.side_effect = save
        artifact.download.side_effect = download
        return artifact


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
    (ValueError("upload of 4096 bytes failed: connection reset"), False),  # issue 10: "409" in "4096"
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


# --- publish: a real offline sweep, read back ----------------------------------------------------------

@pytest.fixture(scope="module")
def offline_sweep(smoke_sweep):
    return smoke_sweep


def test_publish_plan_lists_the_runs_and_the_promoted_model(offline_sweep):
    from flows.publish import plan_publish

    config, summary = offline_sweep
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    assert sorted(map(str, plan.runs_to_sync)) == sorted(t["wandb_run_dir"] for t in summary["trials"])
    assert plan.runs_already_synced == []
    best = next(t for t in summary["trials"] if t["model"] == summary["promotion"]["model"])
    assert (plan.alias, plan.collection, plan.model, plan.digest) == (
        "production", SWEEP_COLLECTION, best["model"], best["digest"])
    assert plan.skip_reason is None and plan.project == config.wandb_project


def test_publish_dry_run_prints_the_plan_without_a_key(offline_sweep, capsys):
    from flows.cli import main

    config, summary = offline_sweep
    assert main(["publish", summary["sweep_id"], "--output-dir", str(config.output_dir), "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == summary["promotion"]["model"] and len(printed["runs_to_sync"]) == 2


def test_publish_without_a_key_says_so(offline_sweep, capsys):
    from flows.cli import main

    config, summary = offline_sweep
    assert main(["publish", summary["sweep_id"], "--output-dir", str(config.output_dir)]) == 1
    assert "WANDB_API_KEY" in capsys.readouterr().err


def test_publish_applies_the_recorded_promotion_to_the_synced_artifacts(offline_sweep, monkeypatch):
    """After `wandb sync`, W&B holds each trial's artifact; the alias goes to the promoted one."""
    from flows import publish as publishing
    from tasks import tracking

    config, summary = offline_sweep
    plan = publishing.plan_publish(summary["sweep_id"], config.output_dir)
    server = FakeServer(collection=SWEEP_COLLECTION)
    server.add_model(0, aliases=["production"])  # an earlier holder in W&B

    def fake_sync(runs, project, entity):  # what `wandb sync` uploads: the runs' artifacts as recorded
        for run_dir in runs:
            for record in tracking.run_records(run_dir):
                if record["type"] == "artifact":
                    artifact = record["artifact"]
                    files = {entry["path"]: Path(entry["local_path"]).read_bytes()
                             for entry in artifact["manifest"]["contents"]}
                    server.add(files, json.loads(artifact["metadata"]), artifact["aliases"])
        return ""

    monkeypatch.setattr(tracking, "require_online_access", lambda project, entity: None)
    result = publishing.publish(plan, registry=WandbRegistry("proj", "ent", api=server.api), sync=fake_sync,
                                log=lambda line: None)
    winner = next(n for n, v in enumerate(server.versions) if v["metadata"].get(DIGEST_KEY) == plan.digest)
    assert result["promotion"] == {"moved": True, "alias": "production", "model": f"{SWEEP_COLLECTION}:v{winner}",
                                   "previous": f"{SWEEP_COLLECTION}:v0"}
    assert server.holders("production") == [f"v{winner}"]
    stored = WandbRegistry("proj", "ent", api=server.api).fetch(f"{SWEEP_COLLECTION}:production")  # digest checked
    assert stored.metadata["sweep_id"] == summary["sweep_id"]


def test_a_superseded_promotion_is_not_replayed(offline_sweep, tmp_path):
    from flows.publish import apply_promotion, plan_publish

    config, summary = offline_sweep
    registry_copy = shutil.copytree(config.registry_dir, tmp_path / "registry")
    local = LocalRegistry(registry_copy)
    loser = next(t["model"] for t in summary["trials"] if t["model"] != summary["promotion"]["model"])
    local.move_alias(local.resolve(*loser.split(":")), "production", reason="manual rollback")
    plan = plan_publish(summary["sweep_id"], config.output_dir, registry_dir=registry_copy)
    assert "superseded" in plan.skip_reason
    server = FakeServer(collection=SWEEP_COLLECTION)
    assert apply_promotion(plan, WandbRegistry("proj", "ent", api=server.api))["moved"] is False
    server.api.artifact.assert_not_called()


def test_publish_refuses_when_the_staged_artifact_files_are_gone(offline_sweep):
    from flows.publish import PublishError, plan_publish
    from tasks import tracking

    config, summary = offline_sweep
    staged = tracking.staged_artifact_files(summary["trials"][0]["wandb_run_dir"])
    assert len(staged) == 2 and all(path.exists() for path in staged)
    hidden = staged[0].with_name(staged[0].name + ".hidden")
    staged[0].rename(hidden)  # as a cleaned-up W&B staging folder would leave it
    try:
        with pytest.raises(PublishError, match="staged artifact file"):
            plan_publish(summary["sweep_id"], config.output_dir)
    finally:
        hidden.rename(staged[0])


def test_sync_that_exits_0_without_syncing_is_an_error(offline_sweep, monkeypatch):
    """Issue 10: `wandb sync` 0.31 prints "Not authenticated." per run and exits 0; publish then
    blamed the sweep. Success is each run's `.wandb.synced` marker."""
    import sys

    from flows.publish import PublishError, plan_publish, sync_runs
    from tasks import tracking

    config, summary = offline_sweep
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    monkeypatch.setattr(tracking, "WANDB_COMMAND", [sys.executable, "-c", "print('Not authenticated.')"])
    with pytest.raises(PublishError, match="2 of 2 run\\(s\\) not synced(.|\\n)*Not authenticated"):
        sync_runs(plan.runs_to_sync, plan.project, plan.entity)


def test_publish_from_another_directory_finds_the_sweeps_registry(offline_sweep, tmp_path, monkeypatch):
    """Issue 10: summary.json kept registry_dir as given (relative); from another directory publish
    saw an empty registry, said "superseded" and exited 0."""
    from flows.publish import PublishError, plan_publish

    config, summary = offline_sweep
    monkeypatch.chdir(tmp_path)
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    assert plan.skip_reason is None and plan.digest == summary["promotion"]["digest"]
    empty = tmp_path / "empty-registry"
    LocalRegistry(empty)
    with pytest.raises(PublishError, match="holds no model with the digest"):
        plan_publish(summary["sweep_id"], config.output_dir, registry_dir=empty)
