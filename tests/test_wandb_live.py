"""Against a real W&B server: two online sweeps, and the alias checked in W&B itself.

Skipped unless WANDB_API_KEY is set (WANDB_BASE_URL picks a server other than W&B's cloud,
WANDB_ENTITY a team). It writes to the project `lr-sweep-live-tests` and uses an alias of its own
(`live-XXXXXXXX`), so a shared project's `production` is never touched.
"""

import os
import uuid

import pytest
import wandb
import wandb_workspaces.reports.v2 as wr

from flows.sweep import lr_sweep
from tasks.reporting.charts import CURVES
from tests.conftest import LIVE_WANDB_API_KEY
from tests.helpers import smoke_config

pytestmark = pytest.mark.skipif(
    not LIVE_WANDB_API_KEY,
    reason="needs WANDB_API_KEY (and optionally WANDB_BASE_URL, WANDB_ENTITY): talks to a real W&B server")

PROJECT = "lr-sweep-live-tests"
COLLECTION = "fashion-mnist-cnn"


def test_an_online_sweep_moves_the_alias_in_wandb_and_leaves_the_old_holder(
        prefect_server, fashion_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", LIVE_WANDB_API_KEY)
    entity = os.environ.get("WANDB_ENTITY")
    alias = f"live-{uuid.uuid4().hex[:8]}"
    online = dict(registry="wandb", wandb_mode="online", wandb_project=PROJECT, wandb_entity=entity,
                  alias=alias, train_limit=2000)
    # A weak first holder (a tiny learning rate, one epoch), then a sweep of two good rates.
    first = lr_sweep(config=smoke_config(tmp_path / "first", fashion_data_dir, learning_rates=[1e-5], **online))
    assert first["promotion"]["promoted"] is True
    old_holder = first["promotion"]["model"]
    second = lr_sweep(config=smoke_config(tmp_path / "second", fashion_data_dir,
                                          learning_rates=[0.001, 0.0005], **online))
    assert second["promotion"]["promoted"] is True, second["promotion"]["reason"]
    assert second["promotion"]["previous"] == old_holder

    api = wandb.Api()
    location = f"{entity or api.default_entity}/{PROJECT}"
    holder = api.artifact(f"{location}/{COLLECTION}:{alias}", type="model")
    assert f"{COLLECTION}:{holder.version}" == second["promotion"]["model"]
    old = api.artifact(f"{location}/{COLLECTION}:{old_holder.split(':')[1]}", type="model")
    assert alias not in old.aliases
    assert holder.metadata["digest"] == next(t["digest"] for t in second["trials"]
                                             if t["model"] == second["promotion"]["model"])
    # Each trial's run logged its model once, through the run (lineage), not a second copy.
    runs = list(api.runs(location, filters={"group": second["sweep_id"]}))
    assert len(runs) == 2
    for run in runs:
        assert [artifact.type for artifact in run.logged_artifacts()] == ["model"]

    # The sweep saved its W&B report: read back from W&B, it plots the sweep's runs by learning rate.
    report = wr.Report.from_url(second["wandb"]["report_url"])
    assert second["sweep_id"] in report.title
    [grid] = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    assert [[metric.name for metric in panel.y] for panel in grid.panels] == [[key] for key, _ in CURVES]
    assert grid.runsets[0].groupby[0].startswith("config.learning_rate") and second["sweep_id"] in str(grid.runsets[0].filters)
