"""Packed trials (tasks/training/packing.py): a member of a pack trains as the same trial alone, a diverged
member stops alone, a killed pack resumes exactly, a model vmap cannot run trains unpacked; and
the default CPU path keeps its weights bit for bit."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from tasks.data.prepare import load_splits, prepare_dataset
from tasks.training.checkpoints import CHECKPOINT_FILE
from tasks.training.determinism import configure_determinism
from tasks.training.identity import input_shape
from tasks.training.pack_plan import pack_key, pack_size, plan_packs
from tasks.training.packed import train_pack
from tasks.training.packing import PackedTrainer, Unpackable
from tasks.training.train import init_model, train_trial
from tests.helpers import trial_spec

# A user model with what packing must carry per member: BatchNorm (running statistics, a
# persistent int buffer), Dropout (its own draws) and a non-persistent buffer used in forward.
USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, image_size, dropout):
        super().__init__()
        # no bias before BatchNorm: its gradient is rounding noise, which Adam scales up to
        # full steps, so it would differ between any two summation orders (packed or not)
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8 * (image_size // 4) ** 2, num_classes)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, images):
        x = torch.relu(self.norm(self.conv(images))) * self.scale
        x = nn.functional.max_pool2d(x, 4).flatten(1)
        return self.head(self.drop(x))


def build(num_classes, in_channels, image_size, dropout=0.0):
    return Net(num_classes, in_channels, image_size, dropout)


class Clamp(torch.autograd.Function):
    """A custom autograd Function without a vmap rule: vmap cannot run it."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-10, 10)

    @staticmethod
    def backward(ctx, grad):
        return grad


class Custom(Net):
    def forward(self, images):
        return Clamp.apply(super().forward(images))


def custom(num_classes, in_channels, image_size):
    return Custom(num_classes, in_channels, image_size, 0.0)
'''


@pytest.fixture
def dataset(synthetic_data_dir):
    return prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)


@pytest.fixture
def splits(dataset):
    return load_splits(dataset, "cpu")


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "pack_models.py"
    path.write_text(USER_MODEL)
    return path


@pytest.fixture
def user_model(user_file) -> str:
    return f"{user_file}:build"


def members(**shared) -> list:
    """Three trials that may share a pack: they differ in rate, seed, warmup and weight decay.
    500 training images in batches of 10: one epoch is 50 steps."""
    values = dict(epochs=1, batch_size=10) | shared
    return [trial_spec(learning_rate=0.001, seed=0, **values),
            trial_spec(learning_rate=0.003, seed=1, warmup_epochs=0.5, **values),
            trial_spec(learning_rate=0.0005, seed=2, weight_decay=0.001, **values)]


def max_difference(first: dict, second: dict) -> float:
    assert set(first) == set(second)
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def identical(first: dict, second: dict) -> bool:
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_pack_member_trains_as_the_same_trial_alone(splits, optimizer):
    specs = members(optimizer=optimizer)
    run = train_pack(specs, splits, "cpu")
    assert run.engine == "packed" and run.reason is None
    for spec, member in zip(specs, run.results):
        alone = train_trial(spec, splits, "cpu")
        assert max_difference(member.state_dict, alone.state_dict) < 1e-5, spec.name
        assert [r["epoch"] for r in member.history] == [1]
        assert member.history[0]["lr"] == alone.history[0]["lr"]
        for metric in ("train_loss", "val_loss", "val_accuracy"):
            assert member.history[0][metric] == pytest.approx(alone.history[0][metric], abs=1e-4)


def test_a_diverged_member_is_frozen_and_the_others_go_on(splits):
    good, other = members()[0], members()[2]
    bad = trial_spec(learning_rate=1e6, seed=5, epochs=1, batch_size=10)
    run = train_pack([good, bad, other], splits, "cpu")
    diverged = run.results[1]
    assert diverged.state_dict is None and "learning rate 1e+06" in diverged.error
    for spec, member in ((good, run.results[0]), (other, run.results[2])):
        assert member.error is None
        assert max_difference(member.state_dict, train_trial(spec, splits, "cpu").state_dict) < 1e-5


def test_a_frozen_member_keeps_its_weights_buffers_and_optimizer_state(splits, dataset, user_model):
    specs = members(model=user_model)[:2]
    models = [init_model(spec, "cpu", input_shape(dataset)) for spec in specs]
    pack = PackedTrainer(models, specs, splits.train_x, splits.train_y)
    before = pack.member_state_dict(1), pack.optimizer_state(1)
    pack.active[:] = torch.tensor([True, False])
    pack._step(torch.arange(20).view(2, 10))
    assert identical(pack.member_state_dict(1), before[0])
    assert all(identical(pack.optimizer_state(1)[name], before[1][name]) for name in before[1])
    assert not identical(pack.member_state_dict(0), models[0].state_dict())


def test_a_killed_pack_resumes_every_member_from_its_own_checkpoint(splits, tmp_path):
    specs = members(epochs=3, batch_size=32)
    dirs = [tmp_path / spec.name for spec in specs]
    uninterrupted = train_pack(specs, splits, "cpu")
    train_pack(specs, splits, "cpu", dirs, stop_at=2)  # "killed" after epoch 2
    assert all((d / CHECKPOINT_FILE).exists() for d in dirs)
    resumed = train_pack(specs, splits, "cpu", dirs)
    for full, again in zip(uninterrupted.results, resumed.results):
        assert again.resumed_from == 2 and [r["epoch"] for r in again.history] == [1, 2, 3]
        assert identical(full.state_dict, again.state_dict)
        assert full.history == again.history


def test_a_member_checkpoint_is_an_unpacked_trials_checkpoint(splits, tmp_path):
    """A member's checkpoint has the keys an unpacked trial's has: the trial may go on alone."""
    specs = members(epochs=2, batch_size=32)
    dirs = [tmp_path / spec.name for spec in specs]
    train_pack(specs, splits, "cpu", dirs, stop_at=1)
    alone = train_trial(specs[0], splits, "cpu", checkpoint_dir=dirs[0])
    assert alone.resumed_from == 1
    assert max_difference(alone.state_dict, train_trial(specs[0], splits, "cpu").state_dict) < 1e-5


def test_a_batchnorm_dropout_user_model_packs_with_per_member_state(splits, user_model):
    specs = members(model=user_model, model_args={"dropout": 0.0})
    run = train_pack(specs, splits, "cpu")
    assert run.engine == "packed"
    for spec, member in zip(specs, run.results):
        alone = train_trial(spec, splits, "cpu").state_dict
        assert "scale" not in member.state_dict and "norm.num_batches_tracked" in member.state_dict
        assert max_difference(member.state_dict, alone) < 1e-5, spec.name  # running statistics too
        assert member.state_dict["norm.num_batches_tracked"].item() == 50


def test_dropout_draws_differ_per_member(splits, user_model):
    """Two members alike in everything: with Dropout their weights part, without they stay equal."""
    for dropout, parted in ((0.5, True), (0.0, False)):
        spec = members(model=user_model, model_args={"dropout": dropout})[0]
        first, second = train_pack([spec, spec], splits, "cpu").results
        assert identical(first.state_dict, second.state_dict) is not parted


def test_a_model_vmap_cannot_run_trains_unpacked_with_the_reason(splits, user_file, dataset):
    specs = members(model=f"{user_file}:custom")[:2]
    with pytest.raises(Unpackable, match="vmap cannot run this model"):
        PackedTrainer([init_model(s, "cpu", input_shape(dataset)) for s in specs], specs, splits.train_x, splits.train_y)
    run = train_pack(specs, splits, "cpu")
    assert run.engine == "eager" and "vmap cannot run this model" in run.reason
    for spec, member in zip(specs, run.results):
        assert identical(member.state_dict, train_trial(spec, splits, "cpu").state_dict)


def test_two_packed_runs_are_bit_identical(splits, user_model):
    specs = members(model=user_model, model_args={"dropout": 0.3})
    first, second = train_pack(specs, splits, "cpu"), train_pack(specs, splits, "cpu")
    for a, b in zip(first.results, second.results):
        assert identical(a.state_dict, b.state_dict)


def test_pack_plan_groups_trials_that_differ_only_in_member_fields():
    a, b, c = members()
    other = trial_spec(batch_size=64)
    assert pack_key(a) == pack_key(b) == pack_key(c) != pack_key(other)
    assert plan_packs([a, other, b, c], 2) == [[a, b], [c], [other]]
    assert pack_size("auto", "cpu") == 1 and pack_size("auto", "cuda") == 32
    assert pack_size("off", "cuda") == 1 and pack_size(4, "cpu") == 4


# sha256 of `train_trial(trial_spec())`'s weights on the synthetic data, 1 CPU thread, computed
# from main's code before the packed engine existed: the default CPU path must keep them bit for bit.
DEFAULT_PATH_DIGEST = "e86c938ccb37d4c6a094b2243efeb8e116f72b19db67527a36e10660718125ac"


def weights_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_default_cpu_path_keeps_its_weights_bit_for_bit(splits, deterministic):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the digest depends on how the convolutions split their work
    try:
        configure_determinism(deterministic)
        assert weights_digest(train_trial(trial_spec(), splits, "cpu").state_dict) == DEFAULT_PATH_DIGEST
    finally:
        configure_determinism(True)
        torch.set_num_threads(threads)


def test_determinism_is_configured_as_asked():
    configure_determinism(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    configure_determinism(True)


def test_a_packed_sweep_records_each_trials_pack_and_engine(prefect_server, sweep_data_dir, tmp_path):
    """--pack 3 on a CPU: one engine call for three trials, one of which diverges; every trial
    keeps its outcome, W&B run and stored model; a second sweep reuses the stored ones."""
    from flows.sweep import lr_sweep
    from models.local_registry import LocalRegistry
    from tests.helpers import COLLECTION, smoke_config

    config = smoke_config(tmp_path, sweep_data_dir, learning_rates=[0.001, 100.0, 0.0005], pack=3)
    summary = lr_sweep(config=config)
    trials = {t["learning_rate"]: t for t in summary["trials"]}
    assert [trials[r]["status"] for r in (0.001, 100.0, 0.0005)] == ["completed", "diverged", "completed"]
    assert "learning rate 100" in trials[100.0]["error"] and trials[100.0]["wandb_run_dir"]
    for trial in trials.values():
        assert trial["engine"] == "packed" and trial["pack"] == {"id": "p0", "size": 3}
        assert trial["deterministic"] is True and trial["engine_reason"] is None
    stored = LocalRegistry(tmp_path / "registry").versions(COLLECTION)
    assert len(stored) == 2 and all(v.metadata["engine"] == "packed" and v.metadata["deterministic"] for v in stored)
    assert all(v.metadata["pack"] == {"id": "p0", "size": 3} for v in stored)

    again = lr_sweep(config=config)
    reused = {t["learning_rate"]: t for t in again["trials"]}
    assert reused[0.001]["cached"] and reused[0.0005]["cached"] and reused[100.0]["status"] == "diverged"
    assert reused[100.0]["pack"] == {"id": "p0", "size": 1}  # the stored members left the pack
