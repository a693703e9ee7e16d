"""SweepConfig: the one place where every default of the sweep lives, composed of groups.

Each group is a pydantic model owned by the code that uses it: the grid and the search
(tasks/search/config.py), training and devices (tasks/training/config.py), the model
(models/config.py), the data (tasks/data/config.py), selection and promotion
(tasks/evaluation/config.py), tracking and storage (tasks/reporting/config.py), dispatch (here).
SweepConfig puts their fields side by side under the flat names users know: the flow's
parameters, the CLI flags, presets, prefect.yaml and the README read their defaults from it, and
every field can be set from the environment as ``LR_SWEEP_<FIELD>`` (lists as JSON, e.g.
``LR_SWEEP_LEARNING_RATES='[0.01, 0.001]'``). `Group.of(config)` hands a step its group. Invalid
values fail here, before any data is touched, with a message that names the field, the bad value
and what is allowed.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.config import ModelConfig
from models.config_group import ConfigGroup
from tasks.data.config import DataConfig
from tasks.evaluation.config import SelectionConfig
from tasks.reporting.config import StorageConfig, TrackingConfig
from tasks.search.config import GridConfig, SearchConfig
from tasks.training.config import DevicesConfig, TrainingConfig

TRIAL_DEPLOYMENT_PATTERN = re.compile(r"lr-sweep-trial/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")


class DispatchConfig(ConfigGroup):
    SECTION = "3 Infrastructure"

    dispatch: Literal["local", "deployment"] = Field(
        title="dispatch", default="local",
        description="local: trials run in the sweep's own flow run; deployment: each trial is a "
        "flow run of TRIAL_DEPLOYMENT, taken by any worker of its pool (several nodes).")
    trial_deployment: str | None = Field(
        title="trial deployment", default=None,
        description="Per-trial deployment (lr-sweep-trial/NAME) used when dispatch is 'deployment'; "
        "none = the lr-sweep-trial deployment on the sweep's own work pool.")
    dispatch_timeout_minutes: float = Field(
        title="dispatch timeout (minutes)", default=120.0, gt=0, le=10080,
        description="With dispatch 'deployment': how long the sweep waits for its trial runs "
        "(0-10080 minutes); runs not finished by then are cancelled and reported as failed.")
    trial_retries: int = Field(
        title="trial retries", default=2, ge=0, le=10,
        description="With dispatch 'deployment': how many times a trial run that crashed or was "
        "lost (its process, worker or machine died) is submitted again, resuming from its last "
        "checkpoint (0-10; a trial that failed or diverged on its own is never re-run).")

    @field_validator("trial_deployment")
    @classmethod
    def _check_trial_deployment(cls, name: str | None) -> str | None:
        if name is not None and not TRIAL_DEPLOYMENT_PATTERN.fullmatch(name):
            raise ValueError(
                f"{name!r} is not allowed: name a deployment of the per-trial flow as "
                "lr-sweep-trial/NAME, e.g. lr-sweep-trial/trial-gpu or lr-sweep-trial/trial-local")
        return name


# The groups in the order of the help and the run form.
GROUPS: tuple[type[ConfigGroup], ...] = (
    GridConfig, TrainingConfig, ModelConfig, DataConfig, SearchConfig, SelectionConfig, DevicesConfig,
    DispatchConfig, TrackingConfig, StorageConfig)
# A preset's tables: [grid], [training], [model], [data], [search], [selection], [devices], ...
GROUP_TABLES = {group.__name__.removesuffix("Config").lower(): group for group in GROUPS}
SECTION_OF = {name: group.SECTION for group in GROUPS for name in group.model_fields}


def _titles_with_sections(schema: dict) -> None:
    """The run form's labels: "1 Experiment · epochs", the section from the field's group."""
    for name, field in schema.get("properties", {}).items():
        field["title"] = f"{SECTION_OF[name]} · {field.get('title', name)}"


# pydantic lists the fields of the bases last to first: the bases are GROUPS reversed.
class SweepConfig(StorageConfig, TrackingConfig, DispatchConfig, DevicesConfig, SelectionConfig, SearchConfig,
                  DataConfig, ModelConfig, TrainingConfig, GridConfig, BaseSettings):
    """Everything a learning-rate sweep needs to know, validated once."""

    model_config = SettingsConfigDict(
        env_prefix="LR_SWEEP_", extra="forbid", frozen=True, validate_default=True,
        json_schema_extra=_titles_with_sections)

    @model_validator(mode="before")
    @classmethod
    def _flatten_group_tables(cls, values):
        """A preset may group its fields in tables named after the groups (`[training]`,
        `epochs = 1`); the fields themselves keep their flat names. A table's value is a dict,
        which no field of the same name (`model`, `search`) takes."""
        if not isinstance(values, dict):
            return values
        flat = {}
        for key, value in values.items():
            group = GROUP_TABLES.get(key)
            if group is None or not isinstance(value, dict):
                flat[key] = value
                continue
            for name, item in value.items():
                if name not in group.model_fields:
                    raise ValueError(f"[{key}] {name}: not a field of the {key} group; its fields: "
                                     f"{', '.join(group.model_fields)}")
                flat[name] = item
        return flat

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_the_epochs(cls, warmup: float, info) -> float:
        # A search's rung may be shorter than the warmup (its schedule is then cut, and so keyed);
        # the sweep's own trials are not, or the warmup would silently never end.
        epochs = info.data.get("epochs")
        if epochs is not None and warmup > epochs:
            raise ValueError(f"{warmup:g} warmup epochs is longer than the {epochs} epoch(s) of a trial: "
                             f"give at most {epochs} (or more epochs)")
        return warmup

    # --- what no one group can check alone ----------------------------------------------------
    @model_validator(mode="after")
    def _check_combination(self) -> SweepConfig:
        if self.search != "grid" and self.dispatch == "deployment":
            raise ValueError(f"search '{self.search}' runs its rungs in the sweep's own flow run; use "
                             "dispatch 'local' with it (several GPUs of one node still run trials at once)")
        if self.search != "grid" and len(self.seeds) != 1:
            raise ValueError(f"search '{self.search}' trains one seed per learning rate; give one seed "
                             f"(got {len(self.seeds)}), or use search 'grid' for seed repeats")
        if self.search == "tpe" and self.learning_rates != SweepConfig.model_fields["learning_rates"].default:
            raise ValueError("search 'tpe' proposes its own learning rates within lr_range; do not "
                             "give learning_rates with it")
        if self.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise ValueError(
                "wandb_mode='online' needs a W&B API key: set WANDB_API_KEY "
                "(or use wandb_mode='offline' and publish later)"
            )
        if self.registry == "wandb" and self.wandb_mode != "online":
            raise ValueError(
                "registry='wandb' needs wandb_mode='online' (offline W&B runs cannot fetch "
                "artifacts); use registry='local' for offline sweeps"
            )
        return self

    # --- derived values -----------------------------------------------------------------------
    def plan_description(self) -> str:
        """What the sweep will train, in words (the rates of `auto` and `tpe` are not known yet)."""
        seeds = f" x {len(self.seeds)} seed(s)" if len(self.seeds) > 1 else ""
        rates = ("the LR range test's rates" if self.learning_rates == "auto"
                 else f"{len(self.learning_rates)} learning rate(s)")
        if self.search == "tpe":
            return f"TPE over {self.lr_range[0]:g}..{self.lr_range[1]:g}, {self.trials} trial(s)"
        if self.search == "asha":
            return f"successive halving of {rates}, {self.epochs} epoch(s) at most"
        return f"{rates}{seeds}, {self.epochs} epoch(s) each"


def _is_union_branch(part) -> bool:
    # pydantic names the member of a union a value failed in the location: list[float], literal['auto']
    return isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "bool"))


def shorten(text: str, limit: int = 120) -> str:
    """A value as an error line shows it: a 6,000-character --model-args is not read back."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem: the field, the value it got and what is allowed. A value that fits
    no member of a union (learning_rates: numbers or 'auto') gets one line with every option."""
    lines: dict[str, list[str]] = {}
    for problem in error.errors():
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                        for part in problem["loc"] if not _is_union_branch(part))
        field = field.lstrip(".") or "config"
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        shown = "" if isinstance(value, dict) else f" (got {shorten(repr(value))})"
        lines.setdefault(field.split("[")[0] if any(map(_is_union_branch, problem["loc"])) else field, []).append(
            f"{message}{shown}")
    return "\n".join(f"{field}: {' - or - '.join(messages)}" for field, messages in lines.items())
