"""The W&B run wrapper: one run per trial, logged through the run object (tasks run in threads).

Modes: `offline` (default; runs land under the sweep's output directory and can be uploaded later
with `wandb sync`), `online` (needs WANDB_API_KEY), `disabled` (a no-op run, for tests that do
not care). Every W&B folder (runs, artifact staging, cache, config) points under the output
directory, so a sweep leaves nothing in the user's home directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import wandb

# How long wandb.init may wait for the W&B server before it gives up with an error, instead of
# its default 90 seconds of silence.
INIT_TIMEOUT_SECONDS = 30


def point_wandb_dirs(output_dir: Path) -> None:
    """Send W&B's caches and staging areas under `output_dir` unless the user chose otherwise.

    These are process-wide environment variables, set once per sweep before any run starts.
    """
    base = Path(output_dir).resolve() / ".wandb"
    for variable, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                          ("WANDB_ARTIFACT_DIR", "artifacts"), ("WANDB_CONFIG_DIR", "config")):
        if not os.environ.get(variable):
            os.environ[variable] = str(base / sub)
            (base / sub).mkdir(parents=True, exist_ok=True)


def start_run(*, mode: str, project: str, entity: str | None, group: str, name: str,
              config: dict, run_dir: Path, job_type: str = "train"):
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        mode=mode, project=project, entity=entity, group=group, name=name, job_type=job_type,
        config=config, dir=str(run_dir), reinit="create_new",
        settings=wandb.Settings(init_timeout=INIT_TIMEOUT_SECONDS, console="off"),
    )


def log_epoch(run, record: dict) -> None:
    """One step per epoch, keyed by the epoch number so charts line up across runs."""
    run.log({key: value for key, value in record.items() if key != "epoch"} | {"epoch": record["epoch"]},
            step=record["epoch"])


def log_model_artifact(run, *, collection: str, files: dict[str, Path], metadata: dict,
                       aliases: list[str]) -> None:
    """Log the model files as a `model` artifact of the run (uploaded on `wandb sync` when offline)."""
    artifact = wandb.Artifact(name=collection, type="model", metadata=metadata)
    for name, path in files.items():
        artifact.add_file(str(path), name=name)
    run.log_artifact(artifact, aliases=aliases)


def run_directory(run) -> str | None:
    """The folder of the run's own files (what `wandb sync` and `wandb leet inspect` take)."""
    directory = getattr(getattr(run, "settings", None), "sync_dir", None)
    return str(directory) if directory else None
