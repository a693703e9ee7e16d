import threading

import pytest
import torch

from models.cnn import architecture, build_model
from models.local_registry import LocalRegistry
from tasks.data.prepare import load_splits, prepare_dataset, tensor_batches
from tasks.evaluation.evaluate import eval_batch_size, measure, place_model
from tasks.training.checkpoints import CHECKPOINT_FILE
from tasks.training.devices import DeviceSlots
from tasks.training.train import TrialDiverged, run_trial, train_trial
from tasks.workspace import RegistrySettings, TrackingSettings, Workspace
from tests.helpers import trial_spec


@pytest.fixture
def dataset(synthetic_data_dir):
    return prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)


@pytest.fixture
def splits(dataset):
    return load_splits(dataset, "cpu")


spec = trial_spec


def test_training_learns_and_records_four_metrics_per_epoch(splits):
    result = train_trial(spec(epochs=3), splits, "cpu")
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    for record in result.history:
        assert set(record) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
        assert 0 <= record["val_accuracy"] <= 1
    assert result.history[-1]["val_accuracy"] > 0.8  # the bars are easy to tell apart
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_gives_bit_identical_weights(splits):
    first = train_trial(spec(), splits, "cpu").state_dict
    second = train_trial(spec(), splits, "cpu").state_dict
    other = train_trial(spec(seed=1), splits, "cpu").state_dict
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_divergence_stops_the_trial(splits):
    with pytest.raises(TrialDiverged, match="learning rate 1e\\+06"):
        train_trial(spec(learning_rate=1e6, epochs=3), splits, "cpu")


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(splits, tmp_path):
    full = train_trial(spec(epochs=3), splits, "cpu")
    train_trial(spec(epochs=2), splits, "cpu", checkpoint_dir=tmp_path)  # "killed" after epoch 2
    resumed = train_trial(spec(epochs=3), splits, "cpu", checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)


def test_stored_weights_measure_the_same_as_in_training(splits):
    result = train_trial(spec(), splits, "cpu")
    model = place_model(build_model(architecture(16)), "cpu")
    model.load_state_dict(result.state_dict)
    _, accuracy = measure(model, tensor_batches(splits.val_x, splits.val_y, eval_batch_size(splits.device)))
    assert accuracy == result.history[-1]["val_accuracy"]


def test_an_unreadable_checkpoint_is_discarded_and_the_trial_starts_over(splits, tmp_path):
    """A torn or foreign checkpoint failed the trial on every rerun."""
    full = train_trial(spec(epochs=2), splits, "cpu")
    for damage in (b"", b"not a safetensors file", None):  # None: the first half of a real one
        train_trial(spec(epochs=1), splits, "cpu", checkpoint_dir=tmp_path)
        path = tmp_path / CHECKPOINT_FILE
        path.write_bytes(damage if damage is not None else path.read_bytes()[: len(path.read_bytes()) // 2])
        again = train_trial(spec(epochs=2), splits, "cpu", checkpoint_dir=tmp_path)
        assert again.resumed_from is None
        assert all(torch.equal(full.state_dict[k], again.state_dict[k]) for k in full.state_dict)
        path.unlink()


def test_a_checkpoint_of_another_network_is_discarded(splits, tmp_path):
    train_trial(spec(epochs=1, hidden_units=32), splits, "cpu", checkpoint_dir=tmp_path)
    assert train_trial(spec(epochs=1), splits, "cpu", checkpoint_dir=tmp_path).resumed_from is None


def test_two_sweeps_of_one_trial_train_it_once(dataset, tmp_path):
    """Two sweeps of the same trial (a schedule and a manual run) shared one checkpoint
    folder and a fixed temporary name. Now they take the trial's lock in turn: one trains, the
    other reuses its model."""
    workspace = Workspace(
        sweep_id="s", sweep_dir=tmp_path / "runs" / "s", checkpoint_root=tmp_path / "runs" / "checkpoints",
        collection="mnist-cnn", tracking=TrackingSettings(mode="disabled", project="p", entity=None),
        registry=RegistrySettings(backend="local", directory=tmp_path / "registry", project="p", entity=None,
                                  registry_collection=None))
    outcomes, errors = [], []

    def sweep():
        try:
            outcomes.append(run_trial(spec(epochs=2), dataset, workspace, DeviceSlots(["cpu"], 1), log=lambda _: None))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(o.cached for o in outcomes) == [False, True]
    assert outcomes[0].model == outcomes[1].model
    assert len(LocalRegistry(tmp_path / "registry").versions("mnist-cnn")) == 1
    assert not list((tmp_path / "runs" / "checkpoints").glob("*/" + CHECKPOINT_FILE))


def test_a_resumed_trial_with_dropout_equals_an_uninterrupted_run(splits, tmp_path):
    """The checkpoint carries the random generator's state: Dropout draws on where it stopped."""
    from tests.test_packing import USER_MODEL

    (tmp_path / "net.py").write_text(USER_MODEL)
    trial = dict(model=f"{tmp_path / 'net.py'}:build", model_args={"dropout": 0.5})
    full = train_trial(spec(epochs=3, **trial), splits, "cpu")
    train_trial(spec(epochs=2, **trial), splits, "cpu", checkpoint_dir=tmp_path / "checkpoint")
    resumed = train_trial(spec(epochs=3, **trial), splits, "cpu", checkpoint_dir=tmp_path / "checkpoint")
    assert resumed.resumed_from == 2
    assert all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)


def test_every_module_of_the_training_engine_counts_in_the_code_version():
    """A fix to the packed engine, a schedule, determinism or the checkpoint format changes what a
    trial trains to, so a rerun must not reuse a model the old code trained (before: of
    tasks/training only train.py counted)."""
    from tasks.provenance import PROJECT_ROOT, training_source_files

    engine = {p.relative_to(PROJECT_ROOT).as_posix() for p in (PROJECT_ROOT / "tasks" / "training").rglob("*.py")}
    assert {"tasks/training/packing.py", "tasks/training/schedules/cosine.py"} <= engine
    assert engine <= set(training_source_files())
