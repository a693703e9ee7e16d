"""Evaluation: a model fetched BY REFERENCE from the registry, rebuilt from its metadata, measured.

`measure` is also what training uses for its per-epoch validation figures, so the validation
accuracy that evaluation measures on the stored weights equals the one logged at the last epoch
(same function, same batch size, same layout).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.cnn import build_model
from models.registry import ModelRef, ModelRegistry
from tasks.data import Splits

# Evaluation batches by device type. On a GPU, large batches: fewer kernel launches, and memory
# is not the limit without activations kept for backward. On a CPU, 512: measured on 2 cores
# (best of 5 over the 10k test images, ReLUs in place) 22,500-26,600 images/s at batch 128-512,
# 16,700 at 1000 (before in-place ReLUs: 14,300-15,000 at 128-512, 7,800 at 1000). Past ~600
# images the first conv's output (50 KB an image) outgrows glibc's 32 MB mmap threshold, so
# every batch maps fresh memory and page-faults it in.
EVAL_BATCH_SIZE = {"cpu": 512, "cuda": 4096}
DEFAULT_EVAL_BATCH_SIZE = 1000


def eval_batch_size(device: torch.device) -> int:
    return EVAL_BATCH_SIZE.get(device.type, DEFAULT_EVAL_BATCH_SIZE)


@dataclass(frozen=True)
class Evaluation:
    val_loss: float
    val_accuracy: float
    test_loss: float
    test_accuracy: float

    def as_dict(self) -> dict:
        return asdict(self)


def place_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Put a network on its device in the layout training and evaluation both use."""
    return model.to(device=device, memory_format=torch.channels_last)


@torch.inference_mode()
def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over a whole split."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    batch = eval_batch_size(images.device)
    for start in range(0, len(images), batch):
        logits = model(images[start:start + batch])
        batch_labels = labels[start:start + batch]
        loss_sum += nn.functional.cross_entropy(logits.float(), batch_labels, reduction="sum")
        correct += (logits.argmax(dim=1) == batch_labels).sum()
    model.train(was_training)
    count = len(images)
    return loss_sum.item() / count, correct.item() / count


def load_model(registry: ModelRegistry, ref: ModelRef | str, device: torch.device | str) -> tuple[nn.Module, dict]:
    """Fetch a stored model (its digest is checked by the registry) and rebuild the network."""
    stored = registry.fetch(ref)
    model = build_model(stored.metadata["architecture"])
    model.load_state_dict(stored.state_dict)
    return place_model(model, device), stored.metadata


def evaluate_stored_model(registry: ModelRegistry, ref: ModelRef | str, splits: Splits,
                          device: torch.device | str) -> Evaluation:
    model, _ = load_model(registry, ref, device)
    val_loss, val_accuracy = measure(model, splits.val_x, splits.val_y)
    test_loss, test_accuracy = measure(model, splits.test_x, splits.test_y)
    return Evaluation(val_loss, val_accuracy, test_loss, test_accuracy)


# --- Prefect ---------------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.context import SweepContext  # noqa: E402
from tasks.data import DatasetRef, load_splits  # noqa: E402


def evaluate_in_sweep(model: str, dataset: DatasetRef, context: SweepContext) -> dict:
    """Evaluate a stored model on the sweep's data, on the next free device."""
    with context.slots().take() as device:
        return evaluate_stored_model(context.registry(), model, load_splits(dataset, device), device).as_dict()


@task(name="evaluate_model", task_run_name="evaluate {model}", cache_policy=NO_CACHE)
def evaluate_model(model: str, dataset: DatasetRef, context: SweepContext) -> dict:
    """Fetch the model by reference (digest checked), rebuild it, measure val and test."""
    return evaluate_in_sweep(model, dataset, context)
