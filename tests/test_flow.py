"""The whole sweep as a real Prefect flow run on the temporary server, on real Fashion-MNIST."""

import json

import pytest

from flows.sweep import lr_sweep
from models.registry import LocalRegistry
from tests.helpers import smoke_config, wandb_records

METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def smoke(prefect_server, fashion_data_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    config = smoke_config(tmp_path, fashion_data_dir)
    return config, lr_sweep(config=config)


def test_summary_json_has_the_agreed_shape(smoke):
    config, summary = smoke
    on_disk = json.loads(open(summary["files"]["summary"]).read())
    assert set(on_disk) >= {"sweep_id", "config", "dataset", "trials", "best", "promotion"}
    assert on_disk["dataset"]["name"] == "fashion-mnist" and len(on_disk["dataset"]["fingerprint"]) == 64
    assert [t["learning_rate"] for t in on_disk["trials"]] == [0.001, 0.0001]
    for trial in on_disk["trials"]:
        assert trial["status"] == "completed" and trial["error"] is None
        assert trial["model"].startswith("fashion-mnist-cnn:v")
        assert [set(r) for r in trial["history"]] == [{"epoch", *METRICS}]
        assert set(trial["evaluation"]) == {"val_loss", "val_accuracy", "test_loss", "test_accuracy"}
        assert 0 <= trial["evaluation"]["test_accuracy"] <= 1
        assert trial["train_seconds"] > 0 and trial["samples_per_second"] > 0
    assert set(on_disk["best"]) == {"learning_rate", "seed", "model"}
    assert set(on_disk["promotion"]) >= {"alias", "model", "previous", "promoted", "reason"}


def test_evaluation_of_the_fetched_model_matches_training(smoke):
    _, summary = smoke
    for trial in summary["trials"]:
        assert trial["evaluation"]["val_accuracy"] == trial["history"][-1]["val_accuracy"]


def test_the_alias_is_on_the_better_model(smoke):
    config, summary = smoke
    best = max(summary["trials"], key=lambda t: t["evaluation"]["val_accuracy"])
    assert summary["best"]["model"] == best["model"]
    assert summary["promotion"]["promoted"] is True
    holder = LocalRegistry(config.registry_dir).resolve("fashion-mnist-cnn", "production")
    assert str(holder) == best["model"]


def test_report_and_charts_are_written(smoke):
    _, summary = smoke
    files = summary["files"]
    for curve in METRICS:
        with open(files[curve], "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(files["report"]).read()
    assert "| learning rate | seed | status | train acc | val acc | test acc" in report
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
        assert artifacts[0]["name"] == "fashion-mnist-cnn"
        assert f"lr-{trial['learning_rate']:g}-seed-0" in artifacts[0]["aliases"]
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
