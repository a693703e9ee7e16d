"""The search algorithms: the LR range test, successive halving and the resumable TPE search.

Rung arithmetic, ranking and the drivers' bookkeeping run on fake, deterministic training
(`FakeTraining`); what depends on real training (bit-identical promotion through checkpoints, the
range test, a search killed with SIGKILL and resumed) runs on the small synthetic IDX dataset of
conftest.py. Run as `python -m tests.test_search --child ...` this file is also the search process
that the kill test starts and kills.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.evaluation.ranking import higher_is_better, rank
from tasks.results import TrialSpec
from tasks.search.halving import epoch_accounting, rung_epochs, successive_halving, survivors
from tasks.search.range_test import lr_range_test, plot_range_test, suggest_lr
from tasks.search.tpe import StudyStorageError, default_storage_url, open_study, tpe_search
from tasks.training.sequential import CheckpointedTrainer
from tasks.training.train import train_trial
from tests.helpers import trial_spec

REPO_ROOT = Path(__file__).resolve().parent.parent


def spec(**overrides) -> TrialSpec:
    return trial_spec(**({"epochs": 3} | overrides))


@pytest.fixture
def splits(synthetic_data_dir):
    from tasks.data.prepare import load_splits, prepare_dataset

    torch.set_num_threads(2)
    ref = prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)
    return load_splits(ref, "cpu")


class FakeTraining:
    """A `train_to` without a network: accuracy peaks at lr 1e-3 and grows with the epochs.
    Records every call; rates in `diverge` are left out of the answer (as a diverged trial)."""

    def __init__(self, diverge=(), fail_after_calls=None, rates=None):
        self.calls: list[tuple[list, int]] = []
        self.rates = rates or {}  # id -> rate, for ids that are not rates
        self.diverge = set(diverge)
        self.fail_after_calls = fail_after_calls

    @staticmethod
    def accuracy(lr: float, epoch: int) -> float:
        return 0.9 - 0.05 * (math.log10(lr) + 3) ** 2 - 0.1 / epoch

    def __call__(self, ids, epoch):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise RuntimeError("worker lost")
        self.calls.append((list(ids), epoch))
        def record(trial, e):
            accuracy = self.accuracy(self.rates.get(trial, trial), e)
            return {"epoch": e, "val_accuracy": accuracy, "val_loss": 1 - accuracy,
                    "train_loss": 0.5, "train_accuracy": 0.8}

        return {t: [record(t, e) for e in range(1, epoch + 1)] for t in ids if t not in self.diverge}


GRID = [float(x) for x in np.logspace(-4, -2, 9)]


# --- rungs, ranking, survivors ----------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ((5, 1, 3), [1, 3, 5]), ((9, 1, 3), [1, 3, 9]), ((27, 1, 3), [1, 3, 9, 27]), ((5, 2, 2), [2, 4, 5]),
    ((1, 1, 3), [1]), ((3, 5, 3), [3]), ((10, 1, 2), [1, 2, 4, 8, 10]), ((28, 1, 3), [1, 3, 9, 27, 28]),
])
def test_rung_epochs_on_fixed_numbers(args, expected):
    assert rung_epochs(*args) == expected


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_epochs=5, grace_epochs=1, reduction_factor=1), "reduction_factor"),
    (dict(max_epochs=5, grace_epochs=0, reduction_factor=3), "grace_epochs"),
    (dict(max_epochs=0, grace_epochs=1, reduction_factor=3), "max_epochs"),
    (dict(max_epochs=5, grace_epochs=1.5, reduction_factor=3), "grace_epochs"),
])
def test_rung_epochs_rejects_bad_inputs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rung_epochs(**kwargs)


def test_survivors_keep_the_top_ceil_n_over_eta_at_least_one():
    scores = {i: i / 10 for i in range(9)}
    kept, stopped = survivors(scores, 3)
    assert kept == [8, 7, 6] and stopped == [5, 4, 3, 2, 1, 0]
    assert survivors({i: i for i in range(4)}, 3)[0] == [3, 2]  # ceil(4/3) = 2
    assert survivors({"only": 0.5}, 3) == (["only"], [])
    assert survivors({}, 3) == ([], [])
    # Losses: lower is better.
    assert survivors({"a": 0.3, "b": 0.1, "c": 0.2}, 3, higher_is_better=False)[0] == ["b"]


def test_survivor_ties_go_to_lower_val_loss_then_smaller_rate_then_id():
    scores = {"x": 0.9, "y": 0.9, "z": 0.9, "w": 0.5}
    assert survivors(scores, 2, val_losses={"x": 0.3, "y": 0.2, "z": 0.25, "w": 0.1})[0] == ["y", "z"]
    rates = {"x": 1e-3, "y": 1e-4, "z": 1e-2, "w": 1e-5}
    assert survivors(scores, 2, learning_rates=rates)[0] == ["y", "x"]
    assert survivors(scores, 2)[0] == ["x", "y"]  # by id
    assert rank({0.01: 0.9, 0.001: 0.9}) == [0.001, 0.01]  # ids that are rates: the smaller first


def test_non_finite_scores_are_never_kept():
    kept, stopped = survivors({"a": float("nan"), "b": 0.2, "c": float("nan")}, 2)
    assert kept == ["b"] and set(stopped) == {"a", "c"}
    assert survivors({"a": float("nan")}, 3) == ([], ["a"])
    with pytest.raises(ValueError, match="reduction_factor"):
        survivors({"a": 1.0}, 1)


# --- successive halving --------------------------------------------------------------------------------

def test_successive_halving_records_who_stopped_where_and_what_it_cost():
    training = FakeTraining()
    result = successive_halving(GRID, rung_epochs(5, 1, 3), 3, training, "val_accuracy")
    assert [(len(ids), epoch) for ids, epoch in training.calls] == [(9, 1), (3, 3), (1, 5)]
    best = min(GRID, key=lambda lr: abs(math.log10(lr) + 3))
    assert result.best == best and list(result.finished) == [best]
    assert [r["epoch"] for r in result.finished[best]] == [1, 2, 3, 4, 5]
    assert sorted(result.stopped_at.values()) == [1] * 6 + [3] * 2
    assert result.epochs_trained[best] == 5 and result.total_epochs == 9 + 3 * 2 + 2 == 17
    assert epoch_accounting(result.epochs_trained, 9, 5) == {
        "epochs_trained": 17, "grid_epochs": 45, "fraction_of_grid": 17 / 45, "epochs_saved": 28, "trials": 9}
    json.dumps(result.as_dict())  # serialisable for summary.json


def test_successive_halving_with_a_loss_metric_and_failed_trials():
    rates = {f"t{i}": lr for i, lr in enumerate(GRID)}
    training = FakeTraining(diverge={"t3"}, rates=rates)  # a rate next to the best diverges at rung 1
    result = successive_halving(rates, [1, 2], 2, training, "val_loss")
    assert result.failed_at == {"t3": 1}
    assert result.best == "t4"  # 1e-3 exactly
    assert len(result.rung_scores[1]) == 8 and len(result.finished) == 4  # ceil(8 scored / 2)
    assert set(result.finished) | set(result.stopped_at) | set(result.failed_at) == {f"t{i}" for i in range(9)}


def test_successive_halving_rejects_bad_inputs():
    with pytest.raises(ValueError, match="reduction_factor"):
        successive_halving(GRID, [1, 3], 1, FakeTraining())
    with pytest.raises(ValueError, match="rungs"):
        successive_halving(GRID, [3, 1], 3, FakeTraining())
    with pytest.raises(ValueError, match="metric"):
        successive_halving(GRID, [1, 3], 3, FakeTraining(), "accuracy")
    with pytest.raises(ValueError, match="empty"):
        successive_halving([], [1, 3], 3, FakeTraining())
    assert higher_is_better("val_loss") is False


def test_a_promoted_survivor_ends_with_the_weights_of_an_uninterrupted_run(splits, tmp_path):
    trainer = CheckpointedTrainer(spec(), splits, "cpu", tmp_path / "checkpoints")
    result = successive_halving([0.0003, 0.003, 0.03], [1, 3], 3, trainer)
    (winner,) = result.finished
    assert trainer.trained.count((winner, 1)) == 1  # epoch 1 was not trained twice
    assert [e for lr, e in trainer.trained if lr == winner] == [1, 2, 3]
    assert trainer.results[winner].resumed_from == 1
    uninterrupted = train_trial(spec(learning_rate=winner, epochs=3), splits, "cpu")
    promoted = trainer.results[winner].state_dict
    assert all(torch.equal(uninterrupted.state_dict[k], promoted[k]) for k in promoted)
    assert result.finished[winner] == uninterrupted.history


# --- the LR range test -------------------------------------------------------------------------------

def synthetic_curve(points=200, steepest=1e-3):
    """A range-test-shaped curve: a plateau, a tanh descent steepest at `steepest` (in log lr),
    a minimum, then a blow-up with a steep fall inside the blown-up tail (which must be ignored)."""
    lrs = np.logspace(-7, 1, points)
    x = np.log10(lrs)
    x0 = math.log10(steepest)
    loss = 2.3 - 1.0 * np.tanh(x - x0)
    loss += np.where(x > x0 + 2, 3.0 * (x - x0 - 2) ** 2, 0.0)
    tail = x > x0 + 3
    # In the tail, a drop far steeper than the real descent, still above the real minimum.
    loss[tail] = np.maximum(4.0, 12 - 40 * (x[tail] - x0 - 3))
    return lrs, loss


def test_suggest_lr_finds_the_steepest_point_and_ignores_the_blown_up_tail():
    lrs, loss = synthetic_curve(steepest=1e-3)
    assert suggest_lr(lrs, loss) == pytest.approx(1e-3, rel=0.1)
    lrs, loss = synthetic_curve(steepest=3e-5)
    assert suggest_lr(lrs, loss) == pytest.approx(3e-5, rel=0.1)


def test_suggest_lr_refuses_curves_without_a_descent():
    lrs = np.logspace(-5, 0, 50)
    with pytest.raises(ValueError, match="lower min_lr"):
        suggest_lr(lrs, np.linspace(2, 9, 50))  # rising from the start
    with pytest.raises(ValueError, match="raise max_lr"):
        suggest_lr(lrs, np.full(50, 2.3))  # flat: max_lr was too low to move the loss
    with pytest.raises(ValueError, match="increasing"):
        suggest_lr(lrs[::-1], np.linspace(9, 2, 50))
    with pytest.raises(ValueError, match="one length"):
        suggest_lr(lrs, np.ones(3))


def test_range_test_on_real_training(splits, tmp_path):
    base = spec(batch_size=8)
    result = lr_range_test(base, splits, "cpu", min_lr=1e-6, max_lr=10.0, max_steps=1000)
    steps_per_epoch = math.ceil(len(splits.train_x) / 8)
    assert result.planned_steps == steps_per_epoch  # capped at one epoch
    assert result.stopped_early and len(result.lrs) < steps_per_epoch  # Adam at lr ~10 blows up
    assert result.lrs[0] == 1e-6 and np.all(np.diff(result.lrs) > 0)
    assert 1e-6 < result.suggestion < result.best_lr
    assert min(result.smoothed) < result.smoothed[0] - 0.5  # the loss did fall before the blow-up
    assert result.smoothed[-1] > result.divergence_factor * min(result.smoothed[:-1])
    chart = plot_range_test(result, tmp_path / "lr_find.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result.as_dict())
    # The test must train the trial's own network: the same seed gives the same first loss.
    again = lr_range_test(base, splits, "cpu", min_lr=1e-6, max_lr=10.0, max_steps=1000)
    assert again.losses == result.losses


def test_range_test_that_blows_up_at_once_says_what_to_change(splits):
    with pytest.raises(ValueError, match="lower min_lr"):
        lr_range_test(spec(batch_size=8), splits, "cpu", min_lr=100.0, max_lr=1e4, max_steps=50)


@pytest.mark.parametrize("kwargs, name", [
    (dict(min_lr=1e-3, max_lr=1e-3), "min_lr"), (dict(min_lr=1e-2, max_lr=1e-3), "min_lr"),
    (dict(min_lr=0.0, max_lr=1.0), "min_lr"), (dict(min_lr=1e-5, max_lr=-1.0), "max_lr"),
    (dict(min_lr=1e-5, max_lr=float("inf")), "max_lr"), (dict(max_steps=2), "max_steps"),
    (dict(beta=1.0), "beta"), (dict(divergence_factor=1.0), "divergence_factor"),
])
def test_range_test_rejects_bad_inputs(splits, kwargs, name):
    with pytest.raises(ValueError, match=name):
        lr_range_test(spec(), splits, "cpu", **kwargs)


# --- the TPE search --------------------------------------------------------------------------------------

def test_tpe_search_trains_in_batches_through_the_rungs(tmp_path):
    study = open_study(default_storage_url(tmp_path / "out"), "s", seed=0, n_startup_trials=3)
    assert (tmp_path / "out" / "optuna.db").exists()
    training = FakeTraining()
    result = tpe_search(study, n_trials=7, parallel=3, lr_range=(1e-4, 1e-2), rungs=[1, 3, 5],
                        train_to=training, metric="val_accuracy")
    assert len(result.trials) == 7 and result.trained_now == list(range(7))
    assert [len(ids) for ids, epoch in training.calls if epoch == 1] == [3, 3, 1]  # batches of 3
    assert all(1e-4 <= t.learning_rate <= 1e-2 for t in result.trials)
    states = {t.state for t in result.trials}
    assert states <= {"complete", "pruned"} and "complete" in states
    # Each trial's epochs are the rung it stopped at (or the last one); the total is their sum.
    for t in result.trials:
        assert t.epochs_trained == (5 if t.state == "complete" else t.stopped_at)
    assert result.epochs_trained == sum(t.epochs_trained for t in result.trials) < 7 * 5
    assert result.best.value == max(t.value for t in result.trials if t.state == "complete")
    assert study.best_trial.number == result.best.number
    # Rung decisions: the first batch keeps ceil(3/3) = 1 at rung 1.
    first = [t for t in result.trials if t.number < 3]
    assert sum(t.state != "pruned" or t.stopped_at > 1 for t in first) == 1
    json.dumps(result.as_dict())


def test_tpe_search_stops_at_the_epoch_budget(tmp_path):
    study = open_study(f"sqlite:///{tmp_path}/o.db", "s", seed=1, n_startup_trials=2)
    result = tpe_search(study, n_trials=100, parallel=2, lr_range=(1e-4, 1e-2), rungs=[1, 3],
                        train_to=FakeTraining(), reduction_factor=2, epoch_budget=10)
    assert result.stopped_by == "epoch_budget"
    assert 10 <= result.epochs_trained < 10 + 2 * 3


def test_tpe_search_resumes_after_a_failed_batch_without_retraining(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    broken = FakeTraining(fail_after_calls=4)  # batch 1: rungs 1 and 3 (2 calls); batch 2: 2; batch 3 dies
    study = open_study(url, "s", seed=0, n_startup_trials=2)
    with pytest.raises(RuntimeError, match="worker lost"):
        tpe_search(study, n_trials=6, parallel=2, lr_range=(1e-4, 1e-2), rungs=[1, 3],
                   train_to=broken, reduction_factor=2)
    before = {t.number: t for t in open_study(url, "s").get_trials()}
    finished = {t.params["learning_rate"] for t in before.values() if t.state.name in ("COMPLETE", "PRUNED")}
    abandoned = [t for t in before.values() if t.state.name == "FAIL"]
    assert len(finished) == 4 and len(abandoned) == 2
    assert sum(t.state.name == "WAITING" for t in before.values()) == 2  # their rates, queued again

    training = FakeTraining()
    result = tpe_search(open_study(url, "s", seed=0, n_startup_trials=2), n_trials=6, parallel=2,
                        lr_range=(1e-4, 1e-2), rungs=[1, 3], train_to=training, reduction_factor=2)
    trained = {lr for ids, _ in training.calls for lr in ids}
    assert not trained & finished  # nothing finished was retrained
    assert {t.params["learning_rate"] for t in abandoned} <= trained  # the abandoned rates ran again
    assert len(result.trials) == 6 and {t.requeued_from for t in result.trials} - {None} == {t.number for t in abandoned}


def test_tpe_search_refuses_a_resume_with_other_settings(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    tpe_search(open_study(url, "s"), 1, 1, (1e-4, 1e-2), [1, 2], FakeTraining())
    with pytest.raises(ValueError, match="rungs"):
        tpe_search(open_study(url, "s"), 2, 1, (1e-4, 1e-2), [1, 3], FakeTraining())
    with pytest.raises(ValueError, match="maximize"):
        tpe_search(open_study(url, "s"), 2, 1, (1e-4, 1e-2), [1, 2], FakeTraining(), "val_loss")
    with pytest.raises(ValueError, match="created to maximize"):
        open_study(url, "s", direction="minimize")


def test_only_trials_whose_driver_is_gone_are_taken_over(tmp_path):
    import optuna

    from tasks.search.tpe import process_owner, recover_stale_trials

    study = open_study(f"sqlite:///{tmp_path}/o.db", "s")
    distribution = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    mine, elsewhere, dead = (study.ask(distribution) for _ in range(3))
    mine.set_user_attr("owner", process_owner())  # this process: alive
    elsewhere.set_user_attr("owner", {"host": "other-node", "pid": 1, "start": 1})
    elsewhere.set_user_attr("heartbeat", time.time() - 120)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid no longer runs (and if reused, by a process with another start time)
    dead.set_user_attr("owner", process_owner() | {"pid": gone.pid})
    assert recover_stale_trials(study) == [dead.number]
    assert recover_stale_trials(study, stale_after_s=600) == []  # the other node beat 2 minutes ago
    assert recover_stale_trials(study, stale_after_s=60) == [elsewhere.number]
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[mine.number] == "RUNNING" and states[dead.number] == states[elsewhere.number] == "FAIL"
    waiting = [t for t in study.get_trials() if t.state.name == "WAITING"]
    assert sorted(t.user_attrs["requeued_from"] for t in waiting) == sorted([dead.number, elsewhere.number])
    assert {t.system_attrs["fixed_params"]["learning_rate"] for t in waiting} == {dead.params["learning_rate"], elsewhere.params["learning_rate"]}


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_trials=0), "n_trials"), (dict(parallel=0), "parallel"), (dict(lr_range=(1e-2, 1e-4)), "lr_range"),
    (dict(lr_range=(0, 1e-2)), "lr_range min"), (dict(rungs=[]), "rungs"), (dict(reduction_factor=1), "reduction_factor"),
    (dict(epoch_budget=0), "epoch_budget"),
])
def test_tpe_search_rejects_bad_inputs(tmp_path, kwargs, name):
    values = dict(n_trials=2, parallel=1, lr_range=(1e-4, 1e-2), rungs=[1, 2], train_to=FakeTraining()) | kwargs
    with pytest.raises(ValueError, match=name):
        tpe_search(open_study(f"sqlite:///{tmp_path}/o.db", "s"), **values)


def test_an_unreachable_storage_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StudyStorageError, match="cannot create the folder"):
        open_study(f"sqlite:///{blocker}/sub/optuna.db", "s")
    with pytest.raises(StudyStorageError, match=r"postgresql://search:\*\*\*@127.0.0.1:9/db"):
        open_study("postgresql://search:secret@127.0.0.1:9/db", "s", connect_timeout_s=2)
    with pytest.raises(StudyStorageError, match="storage"):
        open_study("nosuchdb://x/y", "s")


# --- a search killed with SIGKILL, resumed -----------------------------------------------------------

KILL_SEARCH = dict(n_trials=6, parallel=2, lr_range=(1e-4, 3e-2), rungs=[1, 2], reduction_factor=2)


def child_main(argv) -> None:
    """The killed search: real training on the synthetic data; once a trial is complete, the next
    rung of training runs and then the process hangs before reporting, to be killed there."""
    parser = argparse.ArgumentParser()
    for name in ("--data-dir", "--storage", "--checkpoints", "--ready"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    from tasks.data.prepare import load_splits, prepare_dataset

    torch.set_num_threads(1)
    ref = prepare_dataset("mnist", Path(args.data_dir), 100, 0, None, allow_download=False)
    trainer = CheckpointedTrainer(spec(), load_splits(ref, "cpu"), "cpu", args.checkpoints)
    study = open_study(args.storage, "killed", seed=0, n_startup_trials=2)

    def train_to(ids, epoch):
        histories = trainer(ids, epoch)
        if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
            Path(args.ready).write_text(json.dumps({"ids": list(ids), "epoch": epoch}))
            time.sleep(600)  # "training" when the kill comes
        return histories

    tpe_search(study, train_to=train_to, **KILL_SEARCH)


@pytest.mark.slow  # a child interpreter, SIGKILLed
def test_a_killed_search_resumes_without_retraining_finished_trials(synthetic_data_dir, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    ready = tmp_path / "ready.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.test_search", "--child", "--data-dir", str(synthetic_data_dir),
         "--storage", storage, "--checkpoints", str(tmp_path / "ckpt"), "--ready", str(ready)],
        cwd=REPO_ROOT, start_new_session=True, env=os.environ | {"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        deadline = time.monotonic() + 90
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), f"the search never reached a completed trial (exit code {child.poll()})"
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the whole process group, as a lost worker
        child.wait()
    hung = json.loads(ready.read_text())

    before = open_study(storage, "killed").get_trials()
    finished = {t.params["learning_rate"] for t in before if t.state.name in ("COMPLETE", "PRUNED")}
    running = [t for t in before if t.state.name == "RUNNING"]
    assert any(t.state.name == "COMPLETE" for t in before) and running
    assert {t.params["learning_rate"] for t in running} >= set(hung["ids"])

    from tasks.data.prepare import load_splits, prepare_dataset

    ref = prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)
    trainer = CheckpointedTrainer(spec(), load_splits(ref, "cpu"), "cpu", tmp_path / "ckpt")
    calls = []

    def train_to(ids, epoch):
        calls.append((list(ids), epoch))
        return trainer(ids, epoch)

    result = tpe_search(open_study(storage, "killed", seed=0, n_startup_trials=2), train_to=train_to, **KILL_SEARCH)
    assert sorted(result.recovered) == sorted(t.number for t in running)
    assert not finished & {lr for ids, _ in calls for lr in ids}  # finished trials: not retrained
    assert {t.params["learning_rate"] for t in running} <= {lr for ids, _ in calls for lr in ids}
    # The rung the child had trained when it was killed came back from the checkpoints.
    assert not {(lr, hung["epoch"]) for lr in hung["ids"]} & set(trainer.trained)
    assert len(result.trials) == KILL_SEARCH["n_trials"]
    assert all(t.state in ("complete", "pruned") for t in result.trials)
    after = {t.number: t.state.name for t in open_study(storage, "killed").get_trials()}
    assert all(after[t.number] == "FAIL" for t in running)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
