"""Opens the registry backend a sweep is configured for (the one place that knows both)."""

from __future__ import annotations

from pathlib import Path

from models.local_registry import LocalRegistry
from models.registry import ModelRegistry
from models.wandb_registry import WandbRegistry


def open_registry(backend: str, registry_dir: Path | str, *, project: str, entity: str | None,
                  registry_collection: str | None, run=None) -> ModelRegistry:
    if backend == "local":
        return LocalRegistry(registry_dir)
    if backend == "wandb":
        return WandbRegistry(project=project, entity=entity, registry_collection=registry_collection, run=run)
    raise ValueError(f"unknown registry backend {backend!r}; allowed: local, wandb")
