import pytest
import torch

from models.cnn import architecture, build_model
from tasks.data import load_splits, prepare_dataset
from tasks.evaluate import measure, place_model
from tasks.train import TrialDiverged, TrialSpec, train_trial


@pytest.fixture
def splits(synthetic_data_dir):
    ref = prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)
    return load_splits(ref, "cpu")


def spec(**overrides):
    values = dict(learning_rate=0.003, seed=0, epochs=2, batch_size=32, hidden_units=16, optimizer="adam")
    return TrialSpec(**(values | overrides))


def test_training_learns_and_records_four_metrics_per_epoch(splits):
    result = train_trial(spec(epochs=3), splits, "cpu")
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    for record in result.history:
        assert set(record) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"}
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
    _, accuracy = measure(model, splits.val_x, splits.val_y)
    assert accuracy == result.history[-1]["val_accuracy"]
