"""The learning-rate knobs: schedules stepped per batch, warmup, weight decay, precision; and resume
with each of them."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from tasks.data.prepare import load_splits, prepare_dataset
from tasks.training.checkpoints import CheckpointRefused
from tasks.training.config import TrainingConfig
from tasks.training.identity import checkpoint_folder
from tasks.training.schedules import SCHEDULES, schedule_of
from tasks.training.train import make_optimizer, train_trial
from tests.helpers import trial_spec


def of(name: str, peak: float, warmup_epochs: float, epochs: int, steps_per_epoch: int, **fields):
    training = TrainingConfig(lr_schedule=name, warmup_epochs=warmup_epochs, epochs=epochs, **fields)
    return schedule_of(training, peak, steps_per_epoch)


@pytest.fixture
def splits(synthetic_data_dir):
    return load_splits(prepare_dataset("mnist", synthetic_data_dir, 100, 0, 256, allow_download=False), "cpu")


def test_constant_without_warmup_never_touches_the_rate():
    schedule = of("constant", 0.01, 0.0, epochs=5, steps_per_epoch=10)
    assert not schedule.varies and {schedule.rate(step) for step in range(50)} == {0.01}


def test_warmup_rises_linearly_to_the_rate():
    schedule = of("constant", 0.01, 0.5, epochs=2, steps_per_epoch=10)
    assert schedule.varies and schedule.warmup_steps == 5
    assert [round(schedule.rate(s), 6) for s in range(6)] == [0.002, 0.004, 0.006, 0.008, 0.01, 0.01]


def test_cosine_falls_to_zero_at_the_last_step():
    schedule = of("cosine", 0.1, 0.0, epochs=2, steps_per_epoch=50)
    assert schedule.rate(0) == pytest.approx(0.1)
    assert schedule.rate(50) == pytest.approx(0.05)
    assert schedule.rate(100) == pytest.approx(0.0, abs=1e-12)


def test_onecycle_peaks_at_the_trials_rate_like_torchs_onecycle():
    """The same curve as torch.optim.lr_scheduler.OneCycleLR (cosine, pct_start 0.3, div 25,
    final div 1e4), whose peak is `max_lr`: the trial's rate is the peak."""
    total = 40
    schedule = of("onecycle", 0.01, 0.0, epochs=4, steps_per_epoch=10)
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


def test_step_multiplies_the_rate_every_n_epochs_like_torchs_steplr():
    """Stepped per batch at epoch boundaries: the rate of every step of epoch e is StepLR's
    (step_size 2, gamma 0.5) at epoch e."""
    schedule = of("step", 0.01, 0.0, epochs=6, steps_per_epoch=10, lr_step_epochs=2, lr_step_factor=0.5)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for epoch in range(6):
        rates = [schedule.rate(epoch * 10 + step) for step in range(10)]
        assert rates == pytest.approx([optimizer.param_groups[0]["lr"]] * 10)
        optimizer.step()
        reference.step()
    assert not schedule.DEPENDS_ON_LENGTH and schedule.varies


def test_every_schedule_is_registered_under_its_name_and_offered_by_the_config():
    assert set(SCHEDULES) == set(TrainingConfig.model_fields["lr_schedule"].annotation.__args__)
    assert all(kind.NAME == name for name, kind in SCHEDULES.items())


def test_a_schedule_that_does_not_depend_on_the_length_resumes_under_more_epochs(splits, tmp_path):
    """A step schedule's checkpoint at epoch 2 continues to epoch 3 as a 3-epoch run from the start."""
    three = trial_spec(epochs=3, lr_schedule="step", lr_step_epochs=1, lr_step_factor=0.5)
    full = train_trial(three, splits, "cpu")
    checkpoints = tmp_path / "step"
    train_trial(three.but(epochs=2), splits, "cpu", checkpoint_dir=checkpoints)
    resumed = train_trial(three, splits, "cpu", checkpoint_dir=checkpoints)
    assert resumed.resumed_from == 2
    assert all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)
    assert [r["lr"] for r in resumed.history] == pytest.approx([0.003, 0.0015, 0.00075])


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step"])
def test_a_resumed_scheduled_trial_ends_with_the_weights_of_an_uninterrupted_one(splits, tmp_path, schedule):
    spec = trial_spec(epochs=3, lr_schedule=schedule, warmup_epochs=0.5, lr_step_epochs=1)
    full = train_trial(spec, splits, "cpu")
    train_trial(spec, splits, "cpu", checkpoint_dir=tmp_path, stop_at=2)  # killed after epoch 2
    resumed = train_trial(spec, splits, "cpu", checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    assert all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]
    assert resumed.history[-1]["lr"] < spec.learning_rate / 10  # annealed


def test_a_warmup_cut_to_a_shorter_run_is_not_resumed_by_a_longer_one(splits, tmp_path):
    """Issue 29: a 1-epoch trial with a 2-epoch warmup (cut to 1: a search's rung) left its
    checkpoint, and the 3-epoch trial resumed it, its first epochs on the other curve: weights
    apart from an uninterrupted run. A warmup that fits keeps resuming across --epochs."""
    short, fits, long = (trial_spec(epochs=epochs, warmup_epochs=2) for epochs in (1, 2, 3))

    def trained(spec):  # in its checkpoint folder, as train_model places it
        return train_trial(spec, splits, "cpu", checkpoint_dir=tmp_path / checkpoint_folder(spec, splits.dataset))

    full = train_trial(long, splits, "cpu")
    trained(short)
    after_short = trained(long)
    assert after_short.resumed_from is None
    assert all(torch.equal(full.state_dict[k], after_short.state_dict[k]) for k in full.state_dict)
    for path in tmp_path.iterdir():
        shutil.rmtree(path)
    trained(fits)
    resumed = trained(long)
    assert resumed.resumed_from == 2
    assert all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)


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
