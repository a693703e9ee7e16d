"""The sweep on real Fashion-MNIST (a slice of it), as a user's first run: `make test-slow`.

The fast flow tests run the same path on synthetic IDX files; this one checks the real dataset
files, the real collection name and that the CNN learns the real task."""

import json

import pytest

from flows.sweep import lr_sweep
from models.local_registry import LocalRegistry
from tests.helpers import FASHION_COLLECTION, smoke_config

pytestmark = pytest.mark.slow


def test_a_smoke_sweep_on_real_fashion_mnist(prefect_server, fashion_data_dir, tmp_path):
    config = smoke_config(tmp_path, fashion_data_dir, dataset="fashion-mnist", train_limit=2000, val_size=2000)
    summary = lr_sweep(config=config)
    on_disk = json.loads(open(summary["files"]["summary"]).read())
    assert on_disk["dataset"]["name"] == "fashion-mnist" and on_disk["smoke"] is True
    assert [t["status"] for t in on_disk["trials"]] == ["completed", "completed"]
    for trial in on_disk["trials"]:
        assert trial["model"].startswith(f"{FASHION_COLLECTION}:v")
        assert trial["evaluation"]["val_accuracy"] == trial["history"][-1]["val_accuracy"]
    best = max(on_disk["trials"], key=lambda t: t["evaluation"]["val_accuracy"])
    assert best["evaluation"]["test_accuracy"] > 0.6  # one epoch on 2,000 real images learns something
    holder = LocalRegistry(config.registry_dir).resolve(FASHION_COLLECTION, "production")
    assert str(holder) == on_disk["best"]["model"] and holder.digest == best["digest"]
    assert "Smoke run" in open(summary["files"]["report"]).read()
