"""Searches inside the real flow (temporary server, synthetic data): successive halving stops
trials at rungs and never stores them, survivors end with the weights of an uninterrupted run;
`--learning-rates auto` sweeps around the range test's suggestion. The study resume after a
kill of the real CLI is in tests/test_search_resume.py (slow)."""

from pathlib import Path

import pytest
import torch

from flows.sweep import lr_sweep
from models.local_registry import LocalRegistry
from tasks.data.prepare import load_splits, prepare_dataset
from tasks.results import TrialSpec
from tasks.training.train import train_trial
from tests.helpers import COLLECTION, smoke_config


@pytest.fixture(scope="module")
def halving(prefect_server, sweep_data_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("asha")
    config = smoke_config(tmp_path, sweep_data_dir, search="asha", learning_rates=[0.003, 0.001, 0.00001],
                          epochs=3, grace_epochs=1, reduction_factor=3)
    return config, lr_sweep(config=config)


def test_successive_halving_stops_trials_at_rungs_and_stores_only_finishers(halving):
    config, summary = halving
    search = summary["search"]
    assert (search["method"], search["rungs"], search["reduction_factor"]) == ("asha", [1, 3], 3)
    by_rate = {t["learning_rate"]: t for t in summary["trials"]}
    finished = [t for t in summary["trials"] if t["status"] == "completed"]
    stopped = [t for t in summary["trials"] if t["status"] == "stopped"]
    assert len(finished) == 1 and len(stopped) == 2  # ceil(3 / 3) go on from rung 1
    assert all(t["stopped_at"] == 1 and len(t["history"]) == 1 and t["model"] is None for t in stopped)
    assert search["stopped_at"] == {f"{t['learning_rate']:g}": 1 for t in stopped}
    assert search["epochs_trained"] == 3 + 2 and search["grid_epochs"] == 9  # 3 at rung 1, then 2 more
    versions = LocalRegistry(config.registry_dir).versions(COLLECTION)
    assert [v.metadata["training"]["learning_rate"] for v in versions] == [finished[0]["learning_rate"]]
    holder = LocalRegistry(config.registry_dir).resolve(COLLECTION, "production")
    assert str(holder) == finished[0]["model"] == summary["best"]["model"]
    assert by_rate[0.00001]["status"] == "stopped"  # the far too small rate never goes on
    report = Path(summary["files"]["report"]).read_text()
    assert "## Search" in report and "stopped at epoch 1" in report and "5 epochs trained against 9" in report


def test_a_survivor_ends_with_the_weights_of_an_uninterrupted_run(halving, sweep_data_dir):
    config, summary = halving
    winner = next(t for t in summary["trials"] if t["status"] == "completed")
    assert winner["resumed_from"] == 1  # rung 1's checkpoint, continued to epoch 3
    dataset = prepare_dataset("mnist", sweep_data_dir, config.val_size, 0, None, allow_download=False)
    spec = TrialSpec.shared(config).but(learning_rate=winner["learning_rate"], seed=0)
    uninterrupted = train_trial(spec, load_splits(dataset, "cpu"), "cpu")
    stored = LocalRegistry(config.registry_dir).fetch(winner["model"])
    assert all(torch.equal(uninterrupted.state_dict[k].contiguous(), stored.state_dict[k]) for k in stored.state_dict)
    assert [r["val_accuracy"] for r in uninterrupted.history] == [r["val_accuracy"] for r in winner["history"]]


def test_learning_rates_auto_sweeps_around_the_range_test(prefect_server, sweep_data_dir, tmp_path):
    config = smoke_config(tmp_path, sweep_data_dir, learning_rates="auto", auto_factors=[0.5, 2.0],
                          min_lr=1e-5, max_lr=1.0)
    summary = lr_sweep(config=config)
    sweep_dir = Path(summary["files"]["report"]).parent
    assert (sweep_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rates = sorted(t["learning_rate"] for t in summary["trials"])
    assert len(rates) == 2 and rates[1] / rates[0] == pytest.approx(4.0, rel=0.01)
    assert len(list((sweep_dir / "wandb").glob("offline-run-*"))) == 3  # the range test's run, one per trial
