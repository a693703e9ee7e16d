"""Promotions decided outside a sweep, `lr-sweep promote` and `lr-sweep publish`: the sweep's
own champion/challenger decision (tasks/evaluation/compare.py decide_promotion) with both models fetched
from the registry that will hold the alias (files checked against their digests) and measured on
the candidate's test set, on the CPU. Nothing is moved here."""

from __future__ import annotations

from pathlib import Path

from models.registry import ModelRef, ModelRegistry
from models.sources import ModelSource
from tasks.data.prepare import load_splits, prepare_recorded
from tasks.evaluation.compare import decide_promotion
from tasks.evaluation.evaluate import evaluate_stored_model
from tasks.results import Promotion


def decide_against_holder(registry: ModelRegistry, candidate: ModelRef, metadata: dict, alias: str,
                          margin: float, data_dir: Path | str, allowed: ModelSource | None = None,
                          dataset_spec: str | None = None) -> tuple[Promotion, ModelRef | None]:
    """(the decision, the holder it was made against). `metadata`: the candidate's, as fetched.

    Both models are measured on the test set of the candidate's dataset, each with its own
    normalisation; a holder trained on other data is not compared (the caller's --force). User
    model code is imported only when `allowed` (the command's own --model) names it; an image
    folder or a dataset function is read only as `dataset_spec` (the command's own --dataset)
    names it."""
    dataset = prepare_recorded(metadata["dataset"], dataset_spec, Path(data_dir))
    splits = load_splits(dataset, "cpu")

    def evaluate(model: ModelRef):
        return evaluate_stored_model(registry, model, splits, "cpu", allowed)

    return decide_promotion(registry, candidate, evaluate(candidate), alias, margin, evaluate)
