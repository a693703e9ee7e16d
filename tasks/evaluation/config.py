"""The selection and promotion group: which trial wins and when it takes the alias."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from models.config_group import ConfigGroup
from models.names import check_name


class SelectionConfig(ConfigGroup):
    SECTION = "2 Selection"

    selection_metric: Literal["val_accuracy", "val_loss"] = Field(
        title="metric", default="val_accuracy", description="Metric that picks the best trial.")
    alias: str = Field(
        title="alias", default="production",
        description="Alias given to the winning model: letters, digits, '_', '.', '-' (not 'latest' or a version name like 'v3').")
    promotion_margin: float = Field(
        title="promotion margin", default=0.0, ge=0.0, le=1.0,
        description="The challenger must beat the alias holder's test accuracy by more than this to take the alias (0-1).")

    @field_validator("alias")
    @classmethod
    def _check_alias(cls, alias: str) -> str:
        return check_name("alias", alias)
