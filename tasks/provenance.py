"""Where a model came from: code version and package versions, stored in its metadata."""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The files whose content decides what a trained model is; a change to any of them means a
# cached model of the same configuration is no longer the model this code would train. A folder
# stands for every module below it: the training engine (loop, packs, graphs, determinism,
# schedules, checkpoints) is all of tasks/training.
TRAINING_SOURCES = ("models/cnn.py", "tasks/data/prepare.py", "tasks/data/builtin.py", "tasks/data/imagefolder.py",
                    "tasks/data/function.py", "tasks/training", "tasks/evaluation/evaluate.py")
PACKAGES = ("torch", "torchvision", "prefect", "wandb", "pydantic", "safetensors")


def training_source_files() -> list[str]:
    """TRAINING_SOURCES as files, relative to the project, folders expanded, in a fixed order."""
    files = []
    for relative in TRAINING_SOURCES:
        path = PROJECT_ROOT / relative
        below = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files += [p.relative_to(PROJECT_ROOT).as_posix() for p in below]
    return files


@functools.cache
def code_version() -> dict:
    digest = hashlib.sha256()
    for relative in training_source_files():
        digest.update(relative.encode() + b"\0" + (PROJECT_ROOT / relative).read_bytes() + b"\0")
    try:
        git = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None  # e.g. inside the Docker image, which carries no .git
    return {"training_source_sha256": digest.hexdigest(), "git_commit": git}


@functools.cache
def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = None
    return versions
