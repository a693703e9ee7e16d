"""A TPE search killed with SIGKILL (the real CLI, by process group) and run again with the same
command: the study resumes, trials it finished are not retrained (their models are reused from
the registry), and the search completes its trials."""

import json
import os
import signal
import subprocess

import pytest

from models.local_registry import LocalRegistry
from tests.helpers import COLLECTION, LR_SWEEP, wait_for

pytestmark = pytest.mark.slow


def test_a_killed_tpe_search_resumes_its_study(sweep_data_dir, tmp_path):
    output, registry_dir = tmp_path / "runs", tmp_path / "registry"
    command = [str(LR_SWEEP), "run", "--temporary-server", "--dataset", "mnist", "--search", "tpe", "--trials", "4",
               "--lr-range", "0.0003", "0.01", "--epochs", "3", "--val-size", "200", "--device", "cpu",
               "--data-dir", str(sweep_data_dir), "--output-dir", str(output), "--registry-dir", str(registry_dir)]
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    registry = LocalRegistry(registry_dir)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: registry_dir.exists() and registry.versions(COLLECTION), timeout=300,
                     what="the first trial to be stored", log=tmp_path / "first.log", process=first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    finished_before = {v.ref for v in registry.versions(COLLECTION)}
    assert finished_before and (output / "optuna.db").exists()

    rerun = subprocess.run(command, env=env | {"PREFECT_HOME": str(tmp_path / "prefect-rerun")},
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(next(output.glob("*/summary.json")).read_text())
    assert summary["search"]["method"] == "tpe" and summary["search"]["trials"] == 4
    reused = {t["model"] for t in summary["trials"] if t.get("cached")}
    assert {str(ref) for ref in finished_before} <= reused  # not retrained: taken from the registry
    assert all(t["status"] == "reused" for t in summary["trials"] if t.get("cached"))
    completed = [t for t in summary["trials"] if t["status"] == "completed"]  # trained by the rerun
    # Only the trials the rerun finished itself are new versions.
    assert len(registry.versions(COLLECTION)) == len(finished_before) + len(completed)
    assert str(registry.resolve(COLLECTION, "production")) == summary["best"]["model"]
