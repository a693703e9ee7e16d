"""Helpers shared by the tests: a seeded tiny model, a small real sweep's config, W&B records."""

import subprocess
import sys
import time
from pathlib import Path

import torch

from flows.config import SweepConfig
from models.cnn import architecture, build_model
from models.config import ModelConfig
from tasks.reporting.tracking import run_records
from tasks.results import TrialSpec
from tasks.training.config import TrainingConfig

# The flow tests train on the synthetic IDX files of tests/conftest.py, stored as dataset
# "mnist": models go to this collection.
COLLECTION = "mnist-cnn"
FASHION_COLLECTION = "fashion-mnist-cnn"
LR_SWEEP = Path(sys.executable).parent / "lr-sweep"  # the command a user runs, from this venv


def wait_for(condition, timeout: float, what: str, log: Path, process: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it holds. Fails with the tail of the sweep's output when `timeout`
    passes, and at once when `process` (the sweep) has exited meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) before {what}; it printed:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the sweep printed:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def tiny_model(seed: int, hidden_units: int = 8, **metadata) -> tuple[dict, dict]:
    """(state_dict, metadata) of an untrained CNN with fixed weights: a model to store."""
    torch.manual_seed(seed)
    arch = architecture(hidden_units)
    return build_model(arch).state_dict(), {"architecture": arch, "seed": seed, **metadata}


def smoke_config(tmp_path: Path, data_dir: Path, **overrides) -> SweepConfig:
    """A small real sweep: the synthetic dataset, one epoch, on the CPU."""
    values = dict(dataset="mnist", learning_rates=[0.001, 0.0001], epochs=1, val_size=200,
                  data_dir=data_dir, output_dir=tmp_path / "runs", registry_dir=tmp_path / "registry",
                  device="cpu")
    return SweepConfig(**(values | overrides))


# What an offline W&B run recorded, read back by `wandb leet inspect --json` (one dict a record).
wandb_records = run_records


def trial_spec(**overrides) -> TrialSpec:
    """A small trial with SweepConfig's defaults for everything the test does not set."""
    values = dict(learning_rate=0.003, seed=0, epochs=2, batch_size=32, hidden_units=16) | overrides
    network = ModelConfig(**{name: values.pop(name) for name in list(values) if name in ModelConfig.model_fields})
    return TrialSpec(learning_rate=values.pop("learning_rate"), seed=values.pop("seed"),
                     training=TrainingConfig(**values), network=network)


# --- image folders, as a user's data ------------------------------------------------------------

CLASSES = ("cat", "dog", "fish")


def class_image(label: int, index: int, channels: int = 3, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """A uint8 (C, H, W) image whose pixels say its class and its index."""
    generator = torch.Generator().manual_seed(1000 * label + index)
    image = torch.randint(0, 60, (channels, *size), dtype=torch.uint8, generator=generator)
    image[:, label % size[0]] = 250
    return image


def write_folder(root: Path, per_class: dict[str, int], channels: int = 3, sizes=((8, 8),)) -> Path:
    """PATH/<split>/<class>/<i>.png, image i of a split and class of size sizes[i % len(sizes)]."""
    from torchvision.io import write_png  # torchvision only for the tests that write images
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = class_image(label, index + 100 * len(split), channels, sizes[index % len(sizes)])
                write_png(image, str(root / split / name / f"{index:03d}.png"))
    return root
