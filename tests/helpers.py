"""Helpers shared by the flow tests: read back what a sweep recorded."""

import json
import subprocess
import sys
from pathlib import Path

from flows.config import SweepConfig

WANDB = Path(sys.executable).parent / "wandb"


def smoke_config(tmp_path: Path, data_dir: Path, **overrides) -> SweepConfig:
    """A small real sweep: real Fashion-MNIST, a slice of it, one epoch."""
    values = dict(learning_rates=[0.001, 0.0001], epochs=1, train_limit=1000, val_size=2000,
                  data_dir=data_dir, output_dir=tmp_path / "runs", registry_dir=tmp_path / "registry",
                  device="cpu")
    return SweepConfig(**(values | overrides))


def wandb_records(run_dir: str) -> list[dict]:
    """Every record of an offline W&B run, as `wandb leet inspect --json` reads them back."""
    output = subprocess.run([str(WANDB), "leet", "inspect", "--json", run_dir],
                            capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]
