"""`lr-sweep run` without PREFECT_API_URL: one background Prefect server per PREFECT_HOME, started
by the first run, reused by the next, showing every sweep; `lr-sweep server stop` stops it."""

import os
import subprocess

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import local_server
from tests.helpers import LR_SWEEP

pytestmark = pytest.mark.slow


def test_two_runs_share_one_background_server(sweep_data_dir, tmp_path):
    home = tmp_path / "prefect"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO"}  # Prefect's server messages
    env.pop("PREFECT_API_URL", None)
    command = [str(LR_SWEEP), "run", "--dataset", "mnist", "--learning-rates", "0.001", "--epochs", "1",
               "--val-size", "200", "--device", "cpu", "--data-dir", str(sweep_data_dir),
               "--output-dir", str(tmp_path / "runs"), "--registry-dir", str(tmp_path / "registry")]
    try:
        first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        server = local_server.recorded(home)
        assert server is not None and f"Prefect UI: {server.url} (started" in first.stderr
        assert "Starting temporary server" not in first.stdout + first.stderr  # Prefect read its settings too early
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"Prefect UI: {server.url} (reused" in second.stderr
        assert local_server.recorded(home) == server  # the same process served both
        with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            runs = [run for run in client.read_flow_runs() if run.state and run.state.is_completed()]
        assert len(runs) == 2  # both sweeps, visible in the UI after they ended
    finally:
        stop = subprocess.run([str(LR_SWEEP), "server", "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert "stopped the Prefect server" in stop.stdout
    assert local_server.recorded(home) is None and not local_server.is_healthy(server.url)
