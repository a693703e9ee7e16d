"""What a person sees while a sweep runs: the live view in a terminal, a line per epoch elsewhere."""

import io
import os
import pty
import re
import select
import subprocess
import time

import pytest

from flows.live_view import SweepView
from tasks.reporting.progress import SweepEvent, TrialEvent
from tests.helpers import LR_SWEEP

RECORD = {"train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_epoch_gives_one_line_and_the_eta_follows_the_pace_of_the_epochs():
    clock = Clock()
    view = SweepView(io.StringIO(), clock=clock)
    view.hear(SweepEvent("s1", trials=2, epochs=4))
    assert view.hear(TrialEvent("lr0.01-seed0", 0, "training", state="training", learning_rate=0.01, seed=0,
                                epochs=4)) is None
    clock.now = 10.0
    line = view.hear(TrialEvent("lr0.01-seed0", 25, "epoch 1/4", epoch=1, epochs=4, record=RECORD,
                                images_per_second=5000.0))
    assert line == "lr0.01-seed0 epoch 1/4: train loss 0.5000 acc 80.00% | val loss 0.4000 acc 85.00% | 5,000 img/s"
    row = view.rows["lr0.01-seed0"]
    assert row.eta_seconds() == 30.0  # three epochs left at 10 s each
    done, total, eta = view.sweep_progress()
    assert (done, total, eta) == (1, 8, 70.0)  # the other trial's 4 epochs wait too


def test_a_reused_trial_says_so_and_counts_as_done():
    view = SweepView(io.StringIO())
    view.hear(SweepEvent("s1", trials=1, epochs=3))
    line = view.hear(TrialEvent("lr0.01-seed0", 100, "reused fashion-mnist-cnn:v2@abc", state="reused",
                                model="fashion-mnist-cnn:v2@abc", epochs=3))
    assert line == "lr0.01-seed0 reused: reused fashion-mnist-cnn:v2@abc"
    assert view.sweep_progress()[:2] == (3, 3)


def sweep_command(tmp_path, data_dir, *extra) -> list[str]:
    return [str(LR_SWEEP), "run", "--dataset", "mnist", "--learning-rates", "0.001", "0.0001", "--epochs", "1",
            "--val-size", "200", "--device", "cpu", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "runs"),
            "--registry-dir", str(tmp_path / "registry"), *extra]


def test_without_a_terminal_a_sweep_prints_a_line_per_epoch_and_the_table(prefect_server, sweep_data_dir, tmp_path):
    """The 2-trial smoke sweep printed 28 lines (19 of Prefect's on stderr) before."""
    done = subprocess.run(sweep_command(tmp_path, sweep_data_dir), capture_output=True, text=True, timeout=600,
                          env=os.environ | {"COLUMNS": "200", "PREFECT_LOGGING_LEVEL": "INFO"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) <= 16, "\n".join(lines)
    assert sum(bool(re.match(r"lr0\.0+1-seed0 epoch 1/1: train loss", line)) for line in lines) == 2
    assert not any(" | INFO " in line for line in lines)  # Prefect's own lines went to the log file
    log = next(line for line in lines if line.startswith("log:")).split(maxsplit=1)[1]
    assert "Beginning flow run 'lr-sweep " in open(log).read()  # named after the sweep from its first line


@pytest.mark.slow
def test_in_a_terminal_the_view_redraws_in_place(prefect_server, sweep_data_dir, tmp_path):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(sweep_command(tmp_path, sweep_data_dir, "--epochs", "2"), stdin=terminal,
                               stdout=terminal, stderr=terminal, env=os.environ | {"COLUMNS": "160", "LINES": "40"},
                               close_fds=True)
    os.close(terminal)
    output, deadline = b"", time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=60)
    os.close(controller)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    assert "\x1b[" in text and re.search(r"\x1b\[\d*A", text), "no cursor movement: nothing was redrawn"
    assert "1/2" in text and "2/2" in text  # epoch i/N of each trial, as the epochs end
    assert "ETA" in text and "img/s" in text and "Prefect UI: http" in text
    assert "best: lr" in text  # the table and the decision after the view
