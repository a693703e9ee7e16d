"""A sweep killed with SIGKILL in the middle of training, then run again: finished trials are
reused, the killed one resumes from its last checkpoint, the alias ends on the best model, and
nothing in the registry is half-written. Runs the real CLI in its own process (and its own
temporary Prefect server), as a user would."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from models.local_registry import LocalRegistry
from tests.helpers import FASHION_COLLECTION as COLLECTION
from tests.helpers import LR_SWEEP, wait_for


def checkpoint_rate(path: Path) -> float | None:
    """The learning rate of the trial a checkpoint file belongs to (None while unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads(handle.metadata()["state"])["spec"]["learning_rate"]
    except Exception:  # replaced or removed under our feet: look again
        return None


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining_finished_trials(fashion_data_dir, tmp_path):
    output, registry_dir = tmp_path / "runs", tmp_path / "registry"
    command = [str(LR_SWEEP), "run", "--temporary-server", "--learning-rates", "0.001", "0.0005", "--epochs", "3",
               "--train-limit", "8000", "--val-size", "2000", "--device", "cpu",
               "--output-dir", str(output), "--registry-dir", str(registry_dir), "--data-dir", str(fashion_data_dir)]
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    registry = LocalRegistry(registry_dir)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # One trial stored and the other one in the middle of training (a checkpoint written).
            wait_for(lambda: len(registry.versions(COLLECTION)) == 1 if registry_dir.exists() else False,
                     timeout=300, what="the first trial to be stored", log=tmp_path / "first.log", process=first)
            stored_rate = registry.versions(COLLECTION)[0].metadata["training"]["learning_rate"]
            # A checkpoint names its trial in its header (the folder is the trajectory's key).
            wait_for(lambda: any(checkpoint_rate(p) not in (None, stored_rate)
                                 for p in (output / "checkpoints").glob("*/checkpoint.safetensors")),
                     timeout=120, what="a checkpoint of the second trial", log=tmp_path / "first.log", process=first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the CLI, its flow and its temporary server
            first.wait()
    assert first.returncode == -signal.SIGKILL
    stored_before = registry.versions(COLLECTION)
    assert len(stored_before) == 1 and registry.resolve(COLLECTION, "production") is None, \
        (tmp_path / "first.log").read_text()[-3000:]

    # A fresh Prefect home: resume goes by the registry and the checkpoints, not by Prefect's
    # state, and the killed server's SQLite files are left as SIGKILL left them.
    env["PREFECT_HOME"] = str(tmp_path / "prefect-rerun")
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary_path = next(p for p in output.glob("*/summary.json"))
    summary = json.loads(summary_path.read_text())
    finished_rate = stored_before[0].metadata["training"]["learning_rate"]
    by_rate = {t["learning_rate"]: t for t in summary["trials"]}
    reused, resumed = by_rate[finished_rate], next(t for r, t in by_rate.items() if r != finished_rate)
    assert reused["cached"] is True and reused["model"] == str(stored_before[0].ref)
    assert resumed["cached"] is False and resumed["resumed_from"] in (1, 2, 3)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    # Exactly one new version: the reused trial was not stored again.
    versions = registry.versions(COLLECTION)
    assert len(versions) == 2
    for info in versions:
        registry.fetch(info.ref)  # every version is whole: its digest checks out
    best = max(summary["trials"], key=lambda t: t["evaluation"]["val_accuracy"])
    assert str(registry.resolve(COLLECTION, "production")) == best["model"] == summary["best"]["model"]
    assert not list((output / "checkpoints").glob("*/checkpoint.safetensors"))  # cleaned up
