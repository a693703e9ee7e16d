"""Your model's code, in the loop people run: train, edit the model, train again; the code digest
says which code trained a model (the bytes imported, what they imported, the package's data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from models.local_registry import LocalRegistry

NET = '''import torch
from torch import nn


def build(num_classes, in_channels, image_size, width=4):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(16 * width, num_classes))
'''


def run_sweep(model: str, tmp_path: Path, data_dir: Path, *extra: str) -> int:
    return main(["run", "--model", model, "--dataset", "mnist", "--val-size", "200", "--epochs", "1",
                 "--learning-rates", "0.01", "--batch-size", "64", "--device", "cpu", "--data-dir", str(data_dir),
                 "--output-dir", str(tmp_path / "runs"), "--registry-dir", str(tmp_path / "registry"), *extra])


@pytest.fixture
def server_env(prefect_server, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)  # the session's server, not a new one


def test_an_edited_model_is_gated_on_the_holders_recorded_test_accuracy(server_env, tmp_path, sweep_data_dir,
                                                                        capsys):
    """Sweep a model file, edit it, sweep again: the holder cannot be rebuilt with the new code,
    so the gate compares on its recorded test accuracy, says so, and the sweep writes its report.
    Before: the second sweep crashed in compare-and-promote (ModelCodeChanged), no summary."""
    net = tmp_path / "m" / "net.py"
    net.parent.mkdir()
    net.write_text(NET)
    assert run_sweep(f"{net}:build", tmp_path, sweep_data_dir) == 0
    capsys.readouterr()
    net.write_text(NET.replace("width=4", "width=6"))
    code = run_sweep(f"{net}:build", tmp_path, sweep_data_dir)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "v0 was trained with other model code: compared on its recorded test accuracy" in out, out
    summaries = sorted((tmp_path / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    assert len(summaries) == 2
    summary = json.loads(summaries[-1].read_text())
    assert "compared on its recorded test accuracy" in summary["promotion"]["reason"]
    report = (summaries[-1].parent / "report.md").read_text()
    assert "v0 was trained with other model code: compared on its recorded test accuracy" in report
    holder = LocalRegistry(tmp_path / "registry").resolve("mnist-build", "production")
    assert holder is not None
    # `promote` takes run's model and data flags; a candidate whose code changed since is exit 2,
    # one line naming both digests (before: no --dataset flag, and a traceback).
    recorded = LocalRegistry(tmp_path / "registry").fetch(f"mnist-build:{holder.version}").metadata
    net.write_text(NET.replace("width=4", "width=6") + "\n# tuned after training\n")
    code = main(["promote", f"mnist-build:{holder.version}", "--alias", "staging", "--model", f"{net}:build",
                 "--dataset", "mnist", "--val-size", "200", "--data-dir", str(sweep_data_dir),
                 "--registry-dir", str(tmp_path / "registry")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if "sha256:" in line]
    assert recorded["model_source"]["code_digest"] in line and line.count("sha256:") == 2, err
