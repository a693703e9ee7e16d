"""`lr-sweep models` and `lr-sweep promote`: listing, the gated manual promotion, --force rollback."""

import json

from flows.cli import main
from models.local_registry import LocalRegistry
from tasks.data import load_splits, prepare_dataset
from tasks.evaluate import evaluate_stored_model
from tests.helpers import COLLECTION, tiny_model


def log_untrained(registry, dataset, seed):
    state, metadata = tiny_model(seed, dataset=dataset.as_metadata(), metrics={"val_accuracy": 0.1},
                                 training={"learning_rate": 0.001 * (seed + 1), "seed": seed, "epochs": 0})
    return registry.log_model(COLLECTION, state, metadata)


def test_models_promote_gate_and_force(sweep_data_dir, tmp_path, capsys):
    registry = LocalRegistry(tmp_path / "registry")
    dataset = prepare_dataset("mnist", sweep_data_dir, 200, 0, None, allow_download=False)
    refs = [log_untrained(registry, dataset, seed) for seed in range(2)]
    splits = load_splits(dataset, "cpu")
    accuracy = {ref: evaluate_stored_model(registry, ref, splits, "cpu").test_accuracy for ref in refs}
    better, worse = sorted(refs, key=accuracy.get, reverse=True)
    assert accuracy[better] > accuracy[worse]
    common = ["--registry-dir", str(tmp_path / "registry")]

    assert main(["promote", str(worse), "--alias", "production", "--data-dir", str(sweep_data_dir), *common]) == 0
    assert main(["promote", str(better), "--alias", "production", "--data-dir", str(sweep_data_dir), *common]) == 0
    assert registry.resolve(COLLECTION, "production") == better
    # Back to the worse one: refused by the gate, then done on purpose with --force (a rollback).
    capsys.readouterr()
    assert main(["promote", str(worse), "--alias", "production", "--data-dir", str(sweep_data_dir), *common]) == 1
    assert "not promoted" in capsys.readouterr().err and registry.resolve(COLLECTION, "production") == better
    assert main(["promote", str(worse), "--alias", "production", "--force", *common]) == 0
    assert registry.resolve(COLLECTION, "production") == worse

    capsys.readouterr()
    assert main(["models", "--json", *common]) == 0
    listing = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert "production" in listing[str(worse)]["aliases"]
    assert "production" not in listing[str(better)]["aliases"]
    assert "latest" in listing[f"{COLLECTION}:v1"]["aliases"]
    assert main(["promote", f"{COLLECTION}:v9", "--alias", "production", *common]) == 2


def test_each_model_is_measured_with_its_own_normalisation(sweep_data_dir, tmp_path):
    """The gate normalised every model with the sweep's mean/std; a model trained on a
    slice of the data (other constants) was measured as a different model."""
    registry = LocalRegistry(tmp_path / "registry")
    full = prepare_dataset("mnist", sweep_data_dir, 200, 0, None, allow_download=False)
    sliced = prepare_dataset("mnist", sweep_data_dir, 200, 0, 300, allow_download=False)
    assert (sliced.mean, sliced.std) != (full.mean, full.std)
    ref = log_untrained(registry, sliced, 0)  # trained (here: stored) with the slice's constants
    on_its_own = evaluate_stored_model(registry, ref, load_splits(sliced, "cpu"), "cpu")
    on_the_sweeps = evaluate_stored_model(registry, ref, load_splits(full, "cpu"), "cpu")
    assert on_the_sweeps.test_accuracy == on_its_own.test_accuracy
    assert abs(on_the_sweeps.test_loss - on_its_own.test_loss) < 1e-5


def test_a_holder_trained_on_other_data_is_not_compared_unless_forced(sweep_data_dir, tmp_path, capsys):
    registry = LocalRegistry(tmp_path / "registry")
    dataset = prepare_dataset("mnist", sweep_data_dir, 200, 0, None, allow_download=False)
    other = dataset.as_metadata() | {"fingerprint": "0" * 64}
    holder = registry.log_model(COLLECTION, *tiny_model(5, dataset=other, metrics={}, training={}))
    registry.move_alias(holder, "production")
    candidate = log_untrained(registry, dataset, 1)
    common = ["--registry-dir", str(tmp_path / "registry"), "--data-dir", str(sweep_data_dir)]
    capsys.readouterr()
    assert main(["promote", str(candidate), "--alias", "production", *common]) == 1
    err = capsys.readouterr().err
    assert "cannot be compared on this data" in err and "fingerprint 000000000000" in err
    assert registry.resolve(COLLECTION, "production") == holder
    assert main(["promote", str(candidate), "--alias", "production", "--force", *common]) == 0
    assert registry.resolve(COLLECTION, "production") == candidate
