"""The whole sweep as a real Prefect flow run on the temporary server, on the synthetic dataset
(the same path on real Fashion-MNIST runs in `make test-slow`: tests/test_real_data.py)."""

import base64
import json

import pytest
from prefect.client.orchestration import get_client

from models.local_registry import LocalRegistry
from tests.helpers import COLLECTION, wandb_records

METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def smoke(smoke_sweep):
    return smoke_sweep


def test_summary_json_has_the_agreed_shape(smoke):
    config, summary = smoke
    on_disk = json.loads(open(summary["files"]["summary"]).read())
    assert set(on_disk) >= {"sweep_id", "config", "dataset", "trials", "best", "promotion"}
    assert on_disk["dataset"]["name"] == "mnist" and len(on_disk["dataset"]["fingerprint"]) == 64
    assert [t["learning_rate"] for t in on_disk["trials"]] == [0.001, 0.0001]
    for trial in on_disk["trials"]:
        assert trial["status"] == "completed" and trial["error"] is None
        assert trial["model"].startswith(f"{COLLECTION}:v") and len(trial["digest"]) == 64
        assert [set(r) for r in trial["history"]] == [{"epoch", "lr", *METRICS}]
        assert set(trial["evaluation"]) == {"val_loss", "val_accuracy", "test_loss", "test_accuracy"}
        assert 0 <= trial["evaluation"]["test_accuracy"] <= 1
        assert trial["train_seconds"] > 0 and trial["samples_per_second"] > 0
    assert set(on_disk["best"]) == {"learning_rate", "seed", "model", "digest"}
    assert set(on_disk["promotion"]) >= {"alias", "model", "previous", "promoted", "reason"}


def test_summary_json_times_each_phase_of_the_flow(smoke):
    """What `make bench` splits the fixed cost of `lr-sweep run` into."""
    _, summary = smoke
    on_disk = json.loads(open(summary["files"]["summary"]).read())
    assert set(on_disk["timings"]) == {"prepare_data", "trials", "evaluate", "compare_and_promote", "report_files"}
    assert all(seconds > 0 for seconds in on_disk["timings"].values())
    for trial in on_disk["trials"]:
        assert 0 < trial["wandb_start_seconds"] <= trial["setup_seconds"] < on_disk["timings"]["trials"]


def test_evaluation_of_the_fetched_model_matches_training(smoke):
    _, summary = smoke
    for trial in summary["trials"]:
        assert trial["evaluation"]["val_accuracy"] == trial["history"][-1]["val_accuracy"]


def test_the_alias_is_on_the_better_model(smoke):
    config, summary = smoke
    best = max(summary["trials"], key=lambda t: t["evaluation"]["val_accuracy"])
    assert summary["best"]["model"] == best["model"]
    assert summary["promotion"]["promoted"] is True
    holder = LocalRegistry(config.registry_dir).resolve(COLLECTION, "production")
    assert str(holder) == best["model"] and holder.digest == best["digest"] == summary["promotion"]["digest"]


def test_report_and_charts_are_written(smoke):
    _, summary = smoke
    files = summary["files"]
    for curve in METRICS:
        with open(files[curve], "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(files["report"]).read()
    assert "| learning rate | seed | status | model | val acc | test acc | train acc" in report
    assert "won" in report and summary["best"]["model"] in report


def test_each_trial_has_an_offline_wandb_run_with_metrics_and_model(smoke):
    _, summary = smoke
    for trial in summary["trials"]:
        records = wandb_records(trial["wandb_run_dir"])
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        assert len(history) == 1 and all(metric in history[0] for metric in METRICS)
        assert history[0]["val_accuracy"] == trial["history"][-1]["val_accuracy"]
        artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
        assert len(artifacts) == 1 and artifacts[0]["type"] == "model"
        assert artifacts[0]["name"] == COLLECTION
        assert f"lr{trial['learning_rate']:g}-seed0" in artifacts[0]["aliases"]  # the trial's one name
        assert f"sweep-{summary['sweep_id']}" in artifacts[0]["aliases"]
        paths = {entry["path"] for entry in artifacts[0]["manifest"]["contents"]}
        assert paths == {"model.safetensors", "metadata.json"}
        # The metadata the registry stores, plus the digest that `lr-sweep publish` and the wandb
        # backend check the uploaded files against.
        metadata = json.loads(artifacts[0]["metadata"])
        assert metadata["digest"] == trial["digest"] and metadata["registry_ref"] == trial["model"]
        assert metadata["training"]["learning_rate"] == trial["learning_rate"]
        assert metadata["dataset"]["fingerprint"] == summary["dataset"]["fingerprint"]
        assert metadata["sweep_id"] == summary["sweep_id"] and len(metadata["code"]["training_source_sha256"]) == 64
        assert {"torch", "wandb", "prefect"} <= set(metadata["packages"])


def test_metadata_carries_provenance(smoke):
    config, summary = smoke
    stored = LocalRegistry(config.registry_dir).fetch(summary["best"]["model"])
    metadata = stored.metadata
    assert metadata["dataset"]["fingerprint"] == summary["dataset"]["fingerprint"]
    assert metadata["training"]["learning_rate"] == summary["best"]["learning_rate"]
    assert {"torch", "torchvision", "wandb", "prefect", "python"} <= set(metadata["packages"])
    assert len(metadata["code"]["training_source_sha256"]) == 64
    assert metadata["architecture"]["hidden_units"] == 128


def test_summary_stores_the_paths_it_used_resolved(smoke):
    """A relative registry_dir in summary.json pointed elsewhere when read from another
    directory (publish then saw an empty registry)."""
    _, summary = smoke
    for key in ("registry_dir", "output_dir", "data_dir"):
        assert summary["config"][key].startswith("/")


def test_report_artifact_embeds_its_charts_and_belongs_to_the_flow_run(smoke, prefect_server):
    """The UI showed broken images (relative file names) and 'Flow run: None'."""
    _, summary = smoke
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if summary["sweep_id"] in (a.description or "")]
    report = next(a for a in artifacts if a.key == "lr-sweep-report")
    table = next(a for a in artifacts if a.key == "lr-sweep-trials")
    assert report.flow_run_id is not None and report.task_run_id is None
    assert table.flow_run_id == report.flow_run_id
    images = [part.split(")", 1)[0] for part in report.data.split("](data:image/png;base64,")[1:]]
    assert len(images) == 6  # the four curves, the learning rate, accuracy against the rate
    for image in images:
        assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"
    # Per trial, attached to its task run: a progress bar that reached 100 and a W&B link.
    with get_client(sync_client=True) as client:
        of_the_run = [a for a in client.read_artifacts() if a.flow_run_id == report.flow_run_id]
    progress = {a.key: a for a in of_the_run if a.type == "progress"}
    links = {a.key: a for a in of_the_run if (a.key or "").startswith("wandb-")}  # link artifacts
    assert sorted(progress) == ["progress-lr0-0001-seed0", "progress-lr0-001-seed0"]
    assert all(float(a.data) == 100.0 for a in progress.values())
    assert sorted(links) == ["wandb-lr0-0001-seed0", "wandb-lr0-001-seed0"]
    assert all("lr-sweep publish" in a.description and "](file://" in a.data for a in links.values())
    rows = json.loads(table.data)
    assert [row["learning rate"] for row in rows] == ["0.001", "0.0001"]
    assert all(isinstance(row["val acc %"], float) and row["val acc %"] == round(row["val acc %"], 2) for row in rows)


def test_the_flow_run_is_named_after_its_sweep(smoke):
    _, summary = smoke
    with get_client(sync_client=True) as client:
        report = next(a for a in client.read_artifacts() if a.key == "lr-sweep-report"
                      and summary["sweep_id"] in (a.description or ""))
        assert client.read_flow_run(report.flow_run_id).name == f"lr-sweep {summary['sweep_id']}"
