"""The tracking group (W&B) and the storage group (the model registry and the output folders),
owned by the code that records a sweep."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from models.config_group import ConfigGroup
from models.names import check_name

REGISTRY_COLLECTION_PATTERN = re.compile(r"([A-Za-z0-9_.\-]+/)?wandb-registry-[A-Za-z0-9_.\-]+/[A-Za-z0-9][A-Za-z0-9_.\-]*")


class TrackingConfig(ConfigGroup):
    SECTION = "4 Tracking"

    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        title="W&B mode", default="offline", description="W&B mode; online needs WANDB_API_KEY.")
    wandb_project: str = Field(title="W&B project", default="lr-sweep", min_length=1, description="W&B project.")
    wandb_entity: str | None = Field(title="W&B entity", default=None, description="W&B entity (team or user).")
    wandb_registry_collection: str | None = Field(
        title="W&B Registry collection", default=None,
        description="W&B Registry collection (e.g. wandb-registry-model/fashion-mnist-cnn) where "
        "the promoted model is also linked with the alias; none = no link.")

    @field_validator("wandb_project", "wandb_entity")
    @classmethod
    def _check_wandb_names(cls, name: str | None, info) -> str | None:
        # They become arguments of `wandb sync` and parts of artifact paths (ENTITY/PROJECT/NAME).
        return None if name is None else check_name(info.field_name, name)

    @field_validator("wandb_registry_collection")
    @classmethod
    def _check_registry_collection(cls, path: str | None) -> str | None:
        # W&B Registry paths: [ORG/]wandb-registry-REGISTRY/COLLECTION.
        if path is not None and not REGISTRY_COLLECTION_PATTERN.fullmatch(path):
            raise ValueError(
                f"{path!r} is not allowed: use wandb-registry-REGISTRY/COLLECTION (optionally "
                "ORG/ before it), letters, digits, '_', '.', '-'")
        return path


class StorageConfig(ConfigGroup):
    SECTION = "4 Storage"

    registry: Literal["local", "wandb"] = Field(title="registry backend", default="local", description="Model registry backend.")
    collection: str | None = Field(
        title="registry collection", default=None,
        description="Registry collection of the sweep's models; none = DATASET-MODEL (e.g. fashion-mnist-cnn, "
        "my-folder-resnet18).")
    registry_dir: Path = Field(title="registry directory", default=Path("registry"), description="Directory of the local model registry.")
    output_dir: Path = Field(
        title="output directory", default=Path("runs"),
        description="Sweep outputs go to OUTPUT_DIR/SWEEP_ID (report, charts, W&B runs).")
    sweep_id: str | None = Field(title="sweep id", default=None, description="Name of this sweep; generated when not given.")

    @field_validator("collection")
    @classmethod
    def _check_collection(cls, name: str | None) -> str | None:
        return None if name is None else check_name("collection", name)

    @field_validator("sweep_id")
    @classmethod
    def _check_sweep_id(cls, sweep_id: str | None) -> str | None:
        return None if sweep_id is None else check_name("sweep_id", sweep_id)
