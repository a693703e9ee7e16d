"""`lr-sweep models` and `lr-sweep promote`: listing, the gated manual promotion, --force rollback."""

import json

import torch

from flows.cli import main
from models.cnn import architecture, build_model
from models.registry import LocalRegistry
from tasks.data import load_splits, prepare_dataset
from tasks.evaluate import evaluate_stored_model

COLLECTION = "fashion-mnist-cnn"


def log_untrained(registry, dataset, seed):
    torch.manual_seed(seed)
    arch = architecture(8)
    metadata = {"architecture": arch, "dataset": dataset.as_metadata(),
                "training": {"learning_rate": 0.001 * (seed + 1), "seed": seed, "epochs": 0},
                "metrics": {"val_accuracy": 0.1}}
    return registry.log_model(COLLECTION, build_model(arch).state_dict(), metadata)


def test_models_promote_gate_and_force(fashion_data_dir, tmp_path, capsys):
    registry = LocalRegistry(tmp_path / "registry")
    dataset = prepare_dataset("fashion-mnist", fashion_data_dir, 10000, 0, None, allow_download=False)
    refs = [log_untrained(registry, dataset, seed) for seed in range(2)]
    splits = load_splits(dataset, "cpu")
    accuracy = {ref: evaluate_stored_model(registry, ref, splits, "cpu").test_accuracy for ref in refs}
    better, worse = sorted(refs, key=accuracy.get, reverse=True)
    assert accuracy[better] > accuracy[worse]
    common = ["--registry-dir", str(tmp_path / "registry")]

    assert main(["promote", str(worse), "--alias", "production", "--data-dir", str(fashion_data_dir), *common]) == 0
    assert main(["promote", str(better), "--alias", "production", "--data-dir", str(fashion_data_dir), *common]) == 0
    assert registry.resolve(COLLECTION, "production") == better
    # Back to the worse one: refused by the gate, then done on purpose with --force (a rollback).
    capsys.readouterr()
    assert main(["promote", str(worse), "--alias", "production", "--data-dir", str(fashion_data_dir), *common]) == 1
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
