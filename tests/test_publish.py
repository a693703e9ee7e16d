"""`lr-sweep publish`: a real offline sweep (the session's smoke sweep), read back, planned and
applied to a fake W&B server; the sync's own failures; paths that outlive the working directory."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

from flows import publish as publishing
from flows.cli import main
from flows.publish import PublishError, apply_promotion, plan_publish, sync_runs
from models.errors import InputError
from models.local_registry import LocalRegistry
from models.serialization import model_files
from models.wandb_registry import DIGEST_KEY, WandbRegistry
from tasks.reporting import tracking
from tests.helpers import COLLECTION as SWEEP_COLLECTION
from tests.wandb_fakes import FakeServer, digest_of, small_model

# --- publish: a real offline sweep, read back ----------------------------------------------------------

@pytest.fixture(scope="module")
def offline_sweep(smoke_sweep):
    return smoke_sweep


def test_publish_plan_lists_the_runs_and_the_promoted_model(offline_sweep):
    config, summary = offline_sweep
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    assert sorted(map(str, plan.runs_to_sync)) == sorted(t["wandb_run_dir"] for t in summary["trials"])
    assert plan.runs_already_synced == []
    best = next(t for t in summary["trials"] if t["model"] == summary["promotion"]["model"])
    assert (plan.alias, plan.collection, plan.model, plan.digest) == (
        "production", SWEEP_COLLECTION, best["model"], best["digest"])
    assert plan.skip_reason is None and plan.project == config.wandb_project


def test_publish_dry_run_prints_the_plan_without_a_key(offline_sweep, capsys):
    config, summary = offline_sweep
    assert main(["publish", summary["sweep_id"], "--output-dir", str(config.output_dir), "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == summary["promotion"]["model"] and len(printed["runs_to_sync"]) == 2


def test_publish_without_a_key_says_so(offline_sweep, capsys):
    config, summary = offline_sweep
    assert main(["publish", summary["sweep_id"], "--output-dir", str(config.output_dir)]) == 1
    assert "WANDB_API_KEY" in capsys.readouterr().err


def synced_to(server: FakeServer, report_server=None):
    """What `wandb sync` uploads: the runs' artifacts as recorded (and the project, which it creates)."""
    def fake_sync(runs, project, entity):
        if report_server is not None:
            report_server.projects.append(project)
        for run_dir in runs:
            for record in tracking.run_records(run_dir):
                if record["type"] == "artifact":
                    artifact = record["artifact"]
                    files = {entry["path"]: Path(entry["local_path"]).read_bytes()
                             for entry in artifact["manifest"]["contents"]}
                    server.add(files, json.loads(artifact["metadata"]), artifact["aliases"])
        return ""
    return fake_sync


def add_holder(server: FakeServer, config, summary, seed: int = 0) -> None:
    """An earlier holder of `production` in W&B: an untrained model on the sweep's own data."""
    dataset = LocalRegistry(config.registry_dir).fetch(summary["promotion"]["model"]).metadata["dataset"]
    state, metadata = small_model(seed)
    files = model_files(state, metadata | {"dataset": dataset})
    server.add(files, json.loads(files["metadata.json"]) | {DIGEST_KEY: digest_of(files)}, ["production"])


def test_publish_applies_the_recorded_promotion_to_the_synced_artifacts(offline_sweep, monkeypatch, report_server):
    """After `wandb sync`, W&B holds each trial's artifact; the alias goes to the promoted one once
    it beat W&B's holder, and the sweep's W&B report is saved in the project."""
    config, summary = offline_sweep
    plan = publishing.plan_publish(summary["sweep_id"], config.output_dir)
    server = FakeServer(collection=SWEEP_COLLECTION)
    add_holder(server, config, summary)

    monkeypatch.setattr(tracking, "require_online_access", lambda project, entity: None)
    result = publishing.publish(plan, registry=WandbRegistry("proj", "ent", api=server.api),
                                sync=synced_to(server, report_server), log=lambda line: None)
    winner = next(n for n, v in enumerate(server.versions) if v["metadata"].get(DIGEST_KEY) == plan.digest)
    promotion = result["promotion"]
    assert {k: promotion[k] for k in ("moved", "forced", "alias", "model", "previous")} == {
        "moved": True, "forced": False, "alias": "production", "model": f"{SWEEP_COLLECTION}:v{winner}",
        "previous": f"{SWEEP_COLLECTION}:v0"}
    assert "better than the holder" in promotion["gate"]
    assert server.holders("production") == [f"v{winner}"]
    stored = WandbRegistry("proj", "ent", api=server.api).fetch(f"{SWEEP_COLLECTION}:production")  # digest checked
    assert stored.metadata["sweep_id"] == summary["sweep_id"]
    [report] = report_server.upserts
    assert result["report"].endswith(f"--{report['id']}") and report["projectName"] == plan.project
    assert summary["sweep_id"] in report["displayName"]


def test_an_artifact_that_only_claims_the_digest_gets_nothing(offline_sweep):
    """The alias went to the newest artifact whose METADATA had the digest: anyone who logged one
    with a copied `digest` key won. The files are downloaded and hashed."""
    config, summary = offline_sweep
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    server = FakeServer(collection=SWEEP_COLLECTION)
    synced_to(server)(plan.runs_to_sync, plan.project, plan.entity)
    genuine = next(n for n, v in enumerate(server.versions) if v["metadata"].get(DIGEST_KEY) == plan.digest)
    state, metadata = small_model(7)
    server.add(model_files(state, metadata), metadata | {DIGEST_KEY: plan.digest})  # newer, other files
    result = apply_promotion(plan, WandbRegistry("proj", "ent", api=server.api))
    assert result["moved"] and result["model"] == f"{SWEEP_COLLECTION}:v{genuine}"
    assert server.holders("production") == [f"v{genuine}"]


def test_a_copied_digest_alone_is_refused_with_the_reason(offline_sweep):
    config, summary = offline_sweep
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    server = FakeServer(collection=SWEEP_COLLECTION)
    state, metadata = small_model(7)
    server.add(model_files(state, metadata), metadata | {DIGEST_KEY: plan.digest})
    with pytest.raises(PublishError, match="has files with the digest(.|\n)*refused: .*downloaded files"):
        apply_promotion(plan, WandbRegistry("proj", "ent", api=server.api), attempts=1)
    assert server.holders("production") == []


def test_publish_gates_against_the_holder_in_wandb_unless_forced(offline_sweep):
    """An older offline sweep replaced a better online champion: publish now measures W&B's
    holder as an online sweep would; --force moves the alias anyway and says so."""
    config, summary = offline_sweep
    plan = dataclasses.replace(plan_publish(summary["sweep_id"], config.output_dir), promotion_margin=1.0)
    server = FakeServer(collection=SWEEP_COLLECTION)
    add_holder(server, config, summary)  # no challenger beats it by the whole margin of 1.0
    synced_to(server)(plan.runs_to_sync, plan.project, plan.entity)
    registry = WandbRegistry("proj", "ent", api=server.api)
    kept = apply_promotion(plan, registry)
    assert not kept["moved"] and "stays on" in kept["reason"] and "--force" in kept["reason"]
    assert server.holders("production") == ["v0"]
    forced = apply_promotion(plan, registry, force=True)
    assert forced["moved"] and forced["forced"] and server.holders("production") != ["v0"]
    [record] = server.versions[int(forced["model"].rsplit(":v", 1)[1])]["metadata"]["promotions"]
    assert "--force: not gated" in record["reason"]


@pytest.mark.parametrize("field, value", [("wandb_entity", "--yes"), ("wandb_project", "../elsewhere"),
                                          ("wandb_registry_collection", "wandb-registry-x/../y"),
                                          ("registry_dir", "/proc/1")])
def test_targets_from_summary_json_obey_the_cli_rules(offline_sweep, tmp_path, capsys, field, value):
    """Project, entity, Registry collection and registry_dir came from summary.json unchecked."""
    config, summary = offline_sweep
    sweep = tmp_path / "runs" / summary["sweep_id"]
    sweep.mkdir(parents=True)
    (sweep / "summary.json").write_text(json.dumps(summary | {"config": summary["config"] | {field: value}}))
    with pytest.raises(InputError) as raised:
        plan_publish(summary["sweep_id"], tmp_path / "runs")
    assert raised.value.field == field and str(sweep / "summary.json") in str(raised.value)
    assert main(["publish", summary["sweep_id"], "--output-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    assert f"invalid input:\n{field}: " in capsys.readouterr().err


def test_a_report_that_cannot_be_saved_fails_publish_and_says_what_is_done(offline_sweep, monkeypatch, report_server):
    config, summary = offline_sweep
    plan = publishing.plan_publish(summary["sweep_id"], config.output_dir, project="not-in-wandb")
    monkeypatch.setattr(tracking, "require_online_access", lambda project, entity: None)
    monkeypatch.setattr(publishing, "apply_promotion", lambda plan, registry, **options: {"moved": False, "reason": "test"})
    with pytest.raises(PublishError, match="runs are synced and the promotion applied(.|\n)*not found(.|\n)*"
                                           "Run publish again"):
        publishing.publish(plan, registry=object(), sync=lambda runs, project, entity: "", log=lambda line: None)


def test_a_superseded_promotion_is_not_replayed(offline_sweep, tmp_path):
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
    """`wandb sync` 0.31 prints "Not authenticated." per run and exits 0; publish then
    blamed the sweep. Success is each run's `.wandb.synced` marker."""
    config, summary = offline_sweep
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    monkeypatch.setattr(tracking, "WANDB_COMMAND", [sys.executable, "-c", "print('Not authenticated.')"])
    with pytest.raises(PublishError, match="2 of 2 run\\(s\\) not synced(.|\\n)*Not authenticated"):
        sync_runs(plan.runs_to_sync, plan.project, plan.entity)


def test_publish_from_another_directory_finds_the_sweeps_registry(offline_sweep, tmp_path, monkeypatch):
    """Summary.json kept registry_dir as given (relative); from another directory publish
    saw an empty registry, said "superseded" and exited 0."""
    config, summary = offline_sweep
    monkeypatch.chdir(tmp_path)
    plan = plan_publish(summary["sweep_id"], config.output_dir)
    assert plan.skip_reason is None and plan.digest == summary["promotion"]["digest"]
    empty = tmp_path / "empty-registry"
    LocalRegistry(empty)
    with pytest.raises(PublishError, match="holds no model with the digest"):
        plan_publish(summary["sweep_id"], config.output_dir, registry_dir=empty)


def test_a_corrupt_summary_is_named(tmp_path, capsys):
    sweep = tmp_path / "runs" / "s1"
    sweep.mkdir(parents=True)
    (sweep / "summary.json").write_text('{"config": {"wandb_project": "p" "x"}}')
    assert main(["publish", "s1", "--output-dir", str(tmp_path / "runs"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"{sweep / 'summary.json'} is corrupt" in err and "Traceback" not in err
