"""Helpers shared by the flow tests: read back what a sweep recorded."""

from pathlib import Path

from flows.config import SweepConfig
from tasks.tracking import run_records


def smoke_config(tmp_path: Path, data_dir: Path, **overrides) -> SweepConfig:
    """A small real sweep: real Fashion-MNIST, a slice of it, one epoch."""
    values = dict(learning_rates=[0.001, 0.0001], epochs=1, train_limit=1000, val_size=2000,
                  data_dir=data_dir, output_dir=tmp_path / "runs", registry_dir=tmp_path / "registry",
                  device="cpu")
    return SweepConfig(**(values | overrides))


# What an offline W&B run recorded, read back by `wandb leet inspect --json` (one dict a record).
wandb_records = run_records
