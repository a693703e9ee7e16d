"""The learning-rate knobs: schedules stepped per batch, warmup, weight decay, precision; and resume
with each of them."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.data.prepare import load_splits, prepare_dataset
from tasks.training.checkpoints import CheckpointRefused
from tasks.training.schedule import Schedule
from tasks.training.train import make_optimizer, train_trial
from tests.helpers import trial_spec


@pytest.fixture
def splits(synthetic_data_dir):
    return load_splits(prepare_dataset("mnist", synthetic_data_dir, 100, 0, 256, allow_download=False), "cpu")


def test_constant_without_warmup_never_touches_the_rate():
    schedule = Schedule.of("constant", 0.01, 0.0, epochs=5, steps_per_epoch=10)
    assert not schedule.varies and {schedule.rate(step) for step in range(50)} == {0.01}


def test_warmup_rises_linearly_to_the_rate():
    schedule = Schedule.of("constant", 0.01, 0.5, epochs=2, steps_per_epoch=10)
    assert schedule.varies and schedule.warmup_steps == 5
    assert [round(schedule.rate(s), 6) for s in range(6)] == [0.002, 0.004, 0.006, 0.008, 0.01, 0.01]


def test_cosine_falls_to_zero_at_the_last_step():
    schedule = Schedule.of("cosine", 0.1, 0.0, epochs=2, steps_per_epoch=50)
    assert schedule.rate(0) == pytest.approx(0.1)
    assert schedule.rate(50) == pytest.approx(0.05)
    assert schedule.rate(100) == pytest.approx(0.0, abs=1e-12)


def test_onecycle_peaks_at_the_trials_rate_like_torchs_onecycle():
    """The same curve as torch.optim.lr_scheduler.OneCycleLR (cosine, pct_start 0.3, div 25,
    final div 1e4), whose peak is `max_lr`: the trial's rate is the peak."""
    total = 40
    schedule = Schedule.of("onecycle", 0.01, 0.0, epochs=4, steps_per_epoch=10)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    # torch ends its rise at step pct_start * total_steps - 1 and its fall at total_steps - 1:
    # with these two, both phases span the steps ours do (12 up, 28 down).
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=total + 1,
                                                    pct_start=13 / (total + 1), anneal_strategy="cos")
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    ours = [schedule.rate(step) for step in range(total)]
    assert max(ours) == pytest.approx(0.01) and ours[0] == pytest.approx(0.01 / 25)
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_resumed_scheduled_trial_ends_with_the_weights_of_an_uninterrupted_one(splits, tmp_path, schedule):
    spec = trial_spec(epochs=3, lr_schedule=schedule, warmup_epochs=0.5)
    full = train_trial(spec, splits, "cpu")
    train_trial(spec, splits, "cpu", checkpoint_dir=tmp_path, stop_at=2)  # killed after epoch 2
    resumed = train_trial(spec, splits, "cpu", checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    assert all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]
    assert resumed.history[-1]["lr"] < spec.learning_rate / 10  # annealed


def test_the_rate_of_each_epoch_is_recorded(splits):
    result = train_trial(trial_spec(epochs=2, lr_schedule="cosine"), splits, "cpu")
    first, last = (record["lr"] for record in result.history)
    assert 0 < last < first < 0.003


def test_weight_decay_none_keeps_each_optimizers_default():
    parameters = [torch.zeros(1, requires_grad=True)]
    assert make_optimizer("adamw", parameters, 0.1).defaults["weight_decay"] == 0.01
    assert make_optimizer("adam", parameters, 0.1).defaults["weight_decay"] == 0
    assert make_optimizer("adamw", parameters, 0.1, weight_decay=0.0).defaults["weight_decay"] == 0.0
    assert make_optimizer("sgd", parameters, 0.1, weight_decay=1e-4).defaults["weight_decay"] == 1e-4


def test_weight_decay_changes_the_weights(splits):
    plain = train_trial(trial_spec(epochs=1), splits, "cpu").state_dict
    decayed = train_trial(trial_spec(epochs=1, weight_decay=0.5), splits, "cpu").state_dict
    assert not torch.equal(plain["classifier.1.weight"], decayed["classifier.1.weight"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_the_cpu_and_stores_fp32_weights(splits, tmp_path, precision):
    result = train_trial(trial_spec(epochs=2, precision=precision), splits, "cpu", checkpoint_dir=tmp_path)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] + 0.5
    assert {v.dtype for k, v in result.state_dict.items() if v.is_floating_point()} == {torch.float32}


def test_a_checkpoint_is_not_resumed_under_another_precision(splits, tmp_path):
    train_trial(trial_spec(epochs=2), splits, "cpu", checkpoint_dir=tmp_path, stop_at=1)
    with pytest.raises(CheckpointRefused, match="written in fp32; this trial trains in bf16"):
        train_trial(trial_spec(epochs=2, precision="bf16"), splits, "cpu", checkpoint_dir=tmp_path)
