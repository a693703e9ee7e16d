"""Seed repeats and the champion/challenger gate in real sweeps: 2 learning rates x 2 seeds, then
a second sweep with a clearly worse rate that must leave the alias where it is."""

from pathlib import Path

from flows.sweep import lr_sweep
from models.local_registry import LocalRegistry
from tests.helpers import COLLECTION, smoke_config


def test_seed_repeats_then_a_worse_challenger_keeps_the_champion(prefect_server, sweep_data_dir, tmp_path):
    first = lr_sweep(config=smoke_config(tmp_path, sweep_data_dir, learning_rates=[0.003, 0.0001],
                                         seeds=[0, 1]))
    assert len(first["trials"]) == 4 and all(t["status"] == "completed" for t in first["trials"])
    rows = {row["learning_rate"]: row for row in first["aggregates"]}
    assert set(rows) == {0.003, 0.0001}
    for rate, row in rows.items():
        values = [t["evaluation"]["val_accuracy"] for t in first["trials"] if t["learning_rate"] == rate]
        assert row["val_accuracy"]["n"] == 2
        assert abs(row["val_accuracy"]["mean"] - sum(values) / 2) < 1e-12
        low, high = row["val_accuracy"]["ci95"]
        assert low <= row["val_accuracy"]["mean"] <= high
    assert first["significance"]["test"] == "welch_t" and 0 <= first["significance"]["p_value"] <= 1
    winner = first["aggregates"][0]["learning_rate"]
    seeds_of_winner = [t for t in first["trials"] if t["learning_rate"] == winner]
    assert first["best"]["model"] == max(seeds_of_winner, key=lambda t: t["evaluation"]["val_accuracy"])["model"]
    assert first["promotion"]["promoted"] is True
    report = Path(first["files"]["report"]).read_text()
    assert "## Per learning rate (over seeds)" in report and "Welch's t-test on 2 seeds per rate gives p = " in report
    assert Path(first["files"]["val_accuracy_vs_lr"]).exists()

    # A second sweep whose only rate is far too small: it trains, but must not take the alias.
    second = lr_sweep(config=smoke_config(tmp_path, sweep_data_dir, learning_rates=[0.000003]))
    promotion = second["promotion"]
    assert promotion["promoted"] is False and promotion["previous"] == first["best"]["model"]
    assert promotion["holder_evaluation"]["test_accuracy"] > promotion["challenger_evaluation"]["test_accuracy"]
    holder = LocalRegistry(tmp_path / "registry").resolve(COLLECTION, "production")
    assert str(holder) == first["best"]["model"]
    report = Path(second["files"]["report"]).read_text()
    assert "did not move 'production'" in report and "not better than the holder" in report
