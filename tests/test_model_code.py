"""Your model's code, in the loop people run: train, edit the model, train again; the code digest
says which code trained a model (the bytes imported, what they imported, the package's data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flows.cli import main
from models.local_registry import LocalRegistry
from models.sources import InputShape

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


# --- the code digest: the bytes imported, what they import, the package's data ----------------

HELPED = '''import {helper}
from torch import nn


def build(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, {helper}.WIDTH), nn.ReLU(),
                         nn.Linear({helper}.WIDTH, num_classes))
'''


def test_a_changed_helper_module_changes_the_digest(tmp_path, monkeypatch):
    """A helper beside the model file, imported by it, counts (before: only the file itself)."""
    from models.sources import ModelSource

    helper = f"helper_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "net.py").write_text(HELPED.format(helper=helper))
    (tmp_path / f"{helper}.py").write_text("WIDTH = 8\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = ModelSource(f"{tmp_path / 'net.py'}:build")
    source.refresh()
    before = source.record(InputShape(1, 28, 10))
    assert f"{helper}.py" in before["code_files"] and "net.py" in before["code_files"]
    (tmp_path / f"{helper}.py").write_text("WIDTH = 9\n")
    source.refresh()
    assert source.digest() != before["code_digest"]
    assert source.build(InputShape(1, 28, 10))[1].out_features == 9


def test_a_packages_data_file_counts_and_no_bytecode_is_written(tmp_path, monkeypatch):
    """A JSON of layer sizes in the model's package counts; no .pyc is read or written (a stale
    one could run old code under the new file's digest)."""
    from models.sources import ModelSource

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    package = tmp_path / f"pkg_{tmp_path.name.replace('-', '_')}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sizes.json").write_text('{"width": 8}')
    (package / "net.py").write_text(NET)
    source = ModelSource(f"{package / 'net.py'}:build")
    source.refresh()
    before = source.digest()
    (package / "sizes.json").write_text('{"width": 16}')
    source.refresh()
    assert source.digest() != before
    assert not list(tmp_path.rglob("*.pyc"))


def test_the_digest_is_of_the_code_imported_not_of_a_file_saved_later(tmp_path):
    """A file saved while the sweep trains is not recorded as the code that trained the model:
    the digest is taken from the bytes imported, before training."""
    from models.sources import ModelSource

    net = tmp_path / "saved_later.py"
    net.write_text(NET)
    source = ModelSource(f"{net}:build")
    source.refresh()
    imported = source.digest()
    net.write_text(NET.replace("width=4", "width=6"))  # saved while it trains
    assert source.digest() == imported
    assert source.build(InputShape(1, 28, 10))[0].out_channels == 4  # the code imported runs
    source.refresh()  # the next sweep takes the new code
    assert source.digest() != imported


@pytest.mark.parametrize("body", ["import sys\nsys.exit(0)\n",
                                  "import argparse\nargparse.ArgumentParser().parse_args(['--nope'])\n"])
def test_a_model_file_that_exits_at_import_is_exit_2(body, tmp_path, capsys):
    """Before: sys.exit(0) made `lr-sweep run` exit 0 having trained nothing; an argument parser
    at import printed its own usage as lr-sweep's error."""
    net = tmp_path / "code" / "exits.py"
    net.parent.mkdir()
    net.write_text(body + NET)
    code = main(["run", "--model", f"{net}:build", "--dry-run", "--output-dir", str(tmp_path / "runs"),
                 "--registry-dir", str(tmp_path / "registry"), "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "the model file exited while being imported" in err and "Traceback" not in err, err
    assert "\nmodel: " in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry").exists()


def test_a_rerun_marks_its_trials_reused_not_completed(server_env, tmp_path, sweep_data_dir, capsys):
    """A rerun's trials are the earlier run's models: 'reused', 0 s trained now, from vN, in the
    table, summary.json, the report and the line view. Before: 'completed' with the original
    seconds, as if trained again."""
    net = tmp_path / "m" / "net.py"
    net.parent.mkdir()
    net.write_text(NET)
    assert run_sweep(f"{net}:build", tmp_path, sweep_data_dir) == 0
    capsys.readouterr()
    assert run_sweep(f"{net}:build", tmp_path, sweep_data_dir) == 0
    out = capsys.readouterr().out
    assert "lr0.01-seed0 reused: 0 s trained now, from mnist-build:v0" in out, out  # the view, no terminal
    [row] = [line for line in out.splitlines() if line.strip().startswith("0.01 ")]
    assert row.split()[2] == "reused" and row.split()[-3:] == ["0.0", "from", "mnist-build:v0"], row
    summaries = sorted((tmp_path / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    [trial] = json.loads(summaries[-1].read_text())["trials"]
    assert (trial["status"], trial["reused_from"], trial["train_seconds"]) == ("reused", "mnist-build:v0", 0.0)
    assert trial["evaluation"] is not None  # measured and compared as any trained model
    assert "| reused | from mnist-build:v0 |" in (summaries[-1].parent / "report.md").read_text()


def test_a_helper_shared_by_two_model_files_counts_for_both(tmp_path, monkeypatch):
    """The second file's import finds the helper already imported by the first: it is imported
    (and recorded) again, not left out of the second model's digest."""
    from models.sources import ModelSource

    helper = f"shared_{tmp_path.name.replace('-', '_')}"
    for stem in ("first", "second"):
        (tmp_path / f"{stem}.py").write_text(HELPED.format(helper=helper))
    (tmp_path / f"{helper}.py").write_text("WIDTH = 8\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ModelSource(f"{tmp_path / 'first.py'}:build").refresh()
    second = ModelSource(f"{tmp_path / 'second.py'}:build")
    assert f"{helper}.py" in second.record(InputShape(1, 28, 10))["code_files"]


def holder_and_candidate(tmp_path, holder_fingerprint="data-a", metrics=None):
    from tests.helpers import tiny_model

    registry = LocalRegistry(tmp_path / "registry")
    holder = registry.log_model("mnist-build", *tiny_model(0, dataset={"fingerprint": holder_fingerprint}))
    registry.move_alias(holder, "production", metrics=metrics)
    candidate = registry.log_model("mnist-build", *tiny_model(1, dataset={"fingerprint": "data-a"}))
    return registry, candidate


def other_code(ref):
    from models.sources import ModelCodeChanged

    raise ModelCodeChanged(f"the model code changed since {ref} was trained: ... was sha256:1, it is sha256:2 now")


@pytest.mark.parametrize("fingerprint, metrics, promoted, says", [
    ("data-a", {"val_loss": 0.5, "val_accuracy": 0.8, "test_loss": 0.5, "test_accuracy": 0.80}, True,
     "v0 was trained with other model code: compared on its recorded test accuracy; better than the holder"),
    ("data-a", {"val_loss": 0.5, "val_accuracy": 0.8, "test_loss": 0.5, "test_accuracy": 0.95}, False,
     "v0 was trained with other model code: compared on its recorded test accuracy; not better"),
    ("data-a", None, False, "no test accuracy was recorded when it took the alias: the alias stays"),
    ("data-b", {"val_loss": 0.5, "val_accuracy": 0.8, "test_loss": 0.5, "test_accuracy": 0.80}, False,
     "its recorded test accuracy was measured on other data: the alias stays"),
    ("data-a", {"test_accuracy": "n/a"}, False, "its recorded metrics cannot be read"),
])
def test_the_gate_on_a_holder_with_other_code(tmp_path, fingerprint, metrics, promoted, says):
    """The gate never raises on a holder it cannot rebuild: it decides on the recorded metrics,
    or keeps the alias and says why."""
    from tasks.evaluation.compare import decide_promotion
    from tasks.results import Evaluation

    registry, candidate = holder_and_candidate(tmp_path, fingerprint, metrics)
    challenger = Evaluation(val_loss=0.4, val_accuracy=0.9, test_loss=0.4, test_accuracy=0.90)
    promotion, holder = decide_promotion(registry, candidate, challenger, "production", 0.0, other_code)
    assert (promotion.promoted, holder.version) == (promoted, "v0")
    assert says in promotion.reason, promotion.reason


def test_a_model_file_in_a_package_imports_its_siblings_relatively(tmp_path):
    """`from . import layers` in a package's model file works (before: "attempted relative import
    with no known parent package"), the sibling is recorded, and a change to it is a new digest."""
    from models.sources import ModelSource

    package = tmp_path / "mynets" / "vision"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from .net import build  # the package's own import of the file\n")
    (package / "layers.py").write_text("WIDTH = 8\n")
    (package / "net.py").write_text(HELPED.format(helper="layers").replace("import layers", "from . import layers"))
    source = ModelSource(f"{package / 'net.py'}:build")
    source.refresh()
    record = source.record(InputShape(1, 28, 10))
    assert {"mynets/vision/layers.py", "mynets/vision/net.py", "mynets/__init__.py"} <= set(record["code_files"])
    assert source.build(InputShape(1, 28, 10))[1].out_features == 8
    (package / "layers.py").write_text("WIDTH = 9\n")
    source.refresh()
    assert source.digest() != record["code_digest"]
    assert source.build(InputShape(1, 28, 10))[1].out_features == 9


def test_a_factory_that_exits_while_building_is_exit_2(tmp_path, sweep_data_dir, capsys):
    """sys.exit inside the factory: before, `lr-sweep run --dry-run` ended with the factory's exit
    code (0) at the pre-flight's build."""
    net = tmp_path / "code" / "quits.py"
    net.parent.mkdir()
    net.write_text("import sys\ndef build(num_classes, in_channels, image_size):\n    sys.exit(0)\n")
    code = main(["run", "--model", f"{net}:build", "--dataset", "mnist", "--val-size", "200", "--dry-run",
                 "--output-dir", str(tmp_path / "runs"), "--registry-dir", str(tmp_path / "registry"),
                 "--data-dir", str(sweep_data_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "exited while building the network" in err and "\nmodel: " in err, err


def test_a_model_package_installed_in_site_packages_is_user_code(tmp_path):
    """`pip install` of the user's package (examples/Dockerfile) puts it in the venv's
    site-packages, which lies inside the venv's `platstdlib` folder: it is the user's model, not
    Python's standard library (before: refused as the standard library in the Docker image)."""
    import shutil
    import sysconfig

    from models.sources import ModelSource

    name = f"installed_pkg_{tmp_path.name.replace('-', '_')}"
    installed = Path(sysconfig.get_path("purelib")) / name
    installed.mkdir()
    try:
        (installed / "__init__.py").write_text("")
        (installed / "net.py").write_text(NET)
        source = ModelSource(f"{name}.net:build")
        source.refresh()
        assert any(file.endswith("net.py") for file in source.record(InputShape(1, 28, 10))["code_files"])
        assert source.build(InputShape(1, 28, 10))[-1].out_features == 10
    finally:
        shutil.rmtree(installed)
