"""Evaluation: a model fetched BY REFERENCE from the registry, rebuilt from its metadata, measured.

`measure` is also what training uses for its per-epoch validation figures, so the validation
accuracy that evaluation measures on the stored weights equals the one logged at the last epoch
(same function, same batch size, same layout).

Each model is measured with its OWN input normalisation (the mean and std in its metadata): a
model trained on another slice of the data (a smoke run) saw other constants, and measuring it
with the sweep's would be measuring a different model. Models trained on other data (another
dataset fingerprint) are not measured at all: their accuracy on this test set would not be
comparable.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import nn

from models.registry import ModelRef, ModelRegistry
from models.sources import ModelSource, rebuild
from tasks.data.dataset import DatasetRef, Splits
from tasks.data.prepare import eval_batches, load_splits
from tasks.data.prepare import rescaling as channel_rescaling
from tasks.results import Evaluation, TrialOutcome
from tasks.training.devices import DeviceSlots
from tasks.workspace import Workspace

# Evaluation batches by device type. On a GPU, large batches: fewer kernel launches, and memory
# is not the limit without activations kept for backward. On a CPU, 512: measured on 2 cores
# (best of 5 over the 10k test images, ReLUs in place) 22,500-26,600 images/s at batch 128-512,
# 16,700 at 1000 (before in-place ReLUs: 14,300-15,000 at 128-512, 7,800 at 1000). Past ~600
# images the first conv's output (50 KB an image) outgrows glibc's 32 MB mmap threshold, so
# every batch maps fresh memory and page-faults it in.
EVAL_BATCH_SIZE = {"cpu": 512, "cuda": 4096}
DEFAULT_EVAL_BATCH_SIZE = 1000


class DatasetMismatch(ValueError):
    """A model trained on other data than the data it would be measured on."""


def eval_batch_size(device: torch.device) -> int:
    return EVAL_BATCH_SIZE.get(device.type, DEFAULT_EVAL_BATCH_SIZE)


def place_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Put a network on its device in the layout training and evaluation both use."""
    return model.to(device=device, memory_format=torch.channels_last)


@torch.inference_mode()
def measure(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            rescale: tuple | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over a whole split, given batch by batch;
    `rescale` (scale, shift) maps the split's normalisation to the model's."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = None, None, 0
    for inputs, batch_labels in batches:
        if loss_sum is None:
            loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
            correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
        if rescale is not None:
            inputs = inputs * rescale[0] + rescale[1]
        logits = model(inputs)
        loss_sum += nn.functional.cross_entropy(logits.float(), batch_labels, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_labels).sum()
        count += len(batch_labels)
    model.train(was_training)
    return loss_sum.item() / count, correct.item() / count


def rescaling(data: DatasetRef, model_dataset: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) taking images normalised with the data's constants to the model's, None
    when they are the same. Refuses a model trained on other files (another fingerprint)."""
    fingerprint = model_dataset.get("fingerprint") if model_dataset else None
    if fingerprint != data.fingerprint:
        raise DatasetMismatch(
            f"the model was trained on dataset fingerprint {str(fingerprint)[:12]}…, not on the "
            f"{data.name} files measured here ({data.fingerprint[:12]}…): their test accuracies "
            "are not comparable")
    # Per channel; a model stored before the constants were per channel holds one float each.
    return channel_rescaling(data, model_dataset)


def load_model(registry: ModelRegistry, ref: ModelRef, device: torch.device | str,
               allowed: ModelSource | None = None) -> tuple[nn.Module, dict]:
    """Fetch a stored model (the registry refuses it unless its files have ref.digest) and
    rebuild its network (`rebuild`: user code only when `allowed`, the command's own model
    source, names it, and only when its code digest is the recorded one)."""
    stored = registry.fetch(ref)
    model = rebuild(stored.metadata, allowed, name=str(ref))
    model.load_state_dict(stored.state_dict)
    return place_model(model, device), stored.metadata


def evaluate_stored_model(registry: ModelRegistry, ref: ModelRef, splits: Splits,
                          device: torch.device | str, allowed: ModelSource | None = None) -> Evaluation:
    model, metadata = load_model(registry, ref, device, allowed)
    rescale = rescaling(splits.dataset, metadata.get("dataset"))
    if rescale is not None and torch.is_tensor(rescale[0]):
        rescale = tuple(part.to(splits.device) for part in rescale)
    batch = eval_batch_size(torch.device(splits.device))
    val_loss, val_accuracy = measure(model, eval_batches(splits, "val", batch), rescale)
    test_loss, test_accuracy = measure(model, eval_batches(splits, "test", batch), rescale)
    return Evaluation(val_loss=val_loss, val_accuracy=val_accuracy, test_loss=test_loss,
                      test_accuracy=test_accuracy)


def evaluate_on_free_device(ref: ModelRef, dataset: DatasetRef, workspace: Workspace,
                            slots: DeviceSlots) -> Evaluation:
    """Evaluate a stored model on the sweep's data, on the next free device."""
    with slots.take() as device:
        return evaluate_stored_model(workspace.registry.open(), ref, load_splits(dataset, device), device,
                                     workspace.model_source)


@task(name="evaluate_model", task_run_name="evaluate {trial.name}", cache_policy=NO_CACHE)
def evaluate_model(trial: TrialOutcome, dataset: DatasetRef, workspace: Workspace,
                   slots: DeviceSlots) -> Evaluation:
    """Fetch the trial's model by reference (digest checked), rebuild it, measure val and test."""
    evaluation = evaluate_on_free_device(trial.model, dataset, workspace, slots)
    get_run_logger().info(
        f"{trial.name}: {trial.model.short} val acc {evaluation.val_accuracy:.4f}, "
        f"test acc {evaluation.test_accuracy:.4f} (test loss {evaluation.test_loss:.4f})")
    return evaluation
