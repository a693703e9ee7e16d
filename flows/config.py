"""SweepConfig: the one place where every default of the sweep lives.

The flow's parameters, the CLI flags, prefect.yaml and the README all read their defaults from
this class. Every field can also be set from the environment as ``LR_SWEEP_<FIELD>`` (lists as
JSON, e.g. ``LR_SWEEP_LEARNING_RATES='[0.01, 0.001]'``). Invalid values fail here, before any
data is touched, with a message that names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_serializer, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.names import check_name, rates_sharing_a_name
from models.source_spec import source_kind
from tasks.data.spec import parse_dataset_spec
from tasks.search.checks import check_lr_range

MAX_LEARNING_RATES = 64
MAX_SEEDS = 32
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:\d+")
TRIAL_DEPLOYMENT_PATTERN = re.compile(r"lr-sweep-trial/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
REGISTRY_COLLECTION_PATTERN = re.compile(r"([A-Za-z0-9_.\-]+/)?wandb-registry-[A-Za-z0-9_.\-]+/[A-Za-z0-9][A-Za-z0-9_.\-]*")


class SweepConfig(BaseSettings):
    """Everything a learning-rate sweep needs to know, validated once."""

    model_config = SettingsConfigDict(
        env_prefix="LR_SWEEP_", extra="forbid", frozen=True, validate_default=True
    )

    # --- the experiment -------------------------------------------------------------------
    learning_rates: list[float] | Literal["auto"] = Field(
        title="1 Experiment · learning rates",
        default=[0.001, 0.0005, 0.0001],
        description="Learning rates to try, one trial per rate and seed: 1-64 unique values, each > 0 and <= 100; "
        "'auto' runs the LR range test first and tries auto_factors x its suggestion.",
    )
    seeds: list[int] = Field(
        title="1 Experiment · seeds",
        default=[0], description="Seeds; every learning rate is trained once per seed: 1-32 unique values in [0, 2**31)."
    )
    epochs: int = Field(
        title="1 Experiment · epochs", default=5, ge=1, le=1000, description="Training epochs per trial (1-1000).")
    batch_size: int = Field(
        title="1 Experiment · batch size", default=64, ge=1, le=65536, description="Training batch size (1-65536).")
    hidden_units: int = Field(
        title="1 Experiment · hidden units",
        default=128, ge=1, le=65536, description="Units in the CNN's hidden layer (1-65536)."
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        title="1 Experiment · optimizer",
        default="adam", description="Optimizer (sgd uses momentum 0.9)."
    )
    model: str = Field(
        title="1 Experiment · model", default="cnn",
        description="The network: cnn (the reference CNN), torchvision:NAME (e.g. torchvision:resnet18, "
        "weights=None), package.module:function or path/to/file.py:function (called with num_classes, "
        "in_channels, image_size and model_args; returns a torch.nn.Module).")
    model_args: dict[str, Any] = Field(
        title="1 Experiment · model arguments", default={},
        description='Keyword arguments of the model\'s builder, a JSON object (e.g. {"width": 64}); '
        "recorded with every model.")
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(
        title="1 Experiment · learning-rate schedule", default="constant",
        description="Per-batch schedule of each trial's rate: constant, cosine (to 0 over the epochs) or "
        "onecycle (the trial's rate is the peak, as fastai's fit_one_cycle).")
    warmup_epochs: float = Field(
        title="1 Experiment · warmup epochs", default=0.0, ge=0, le=1000,
        description="Linear warmup from 0 to the trial's rate over this many epochs (0-1000, may be a "
        "fraction; onecycle: its rising phase, 0 = 30% of the epochs).")
    weight_decay: float | None = Field(
        title="1 Experiment · weight decay", default=None, ge=0, le=10,
        description="Optimizer weight decay (0-10; decoupled with adamw); none = the optimizer's default "
        "(adamw 0.01, adam and sgd 0).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        title="1 Experiment · precision", default="fp32",
        description="Training precision: fp32, bf16 autocast (CPU and GPU) or fp16 autocast with a "
        "gradient scaler; evaluation is fp32.")
    dataset: str = Field(
        title="1 Experiment · dataset",
        default="fashion-mnist",
        description="Data: fashion-mnist, mnist or kmnist (28x28 grey, 10 classes); imagefolder:PATH "
        "(PATH/train/CLASS/*, PATH/test/CLASS/*, optional PATH/val/CLASS/*); package.module:function or "
        "path/to/file.py:function returning (train_images, train_labels, test_images, test_labels"
        "[, class_names]) tensors or (train, test[, class_names]) Datasets.",
    )
    image_size: int | None = Field(
        title="1 Experiment · image size",
        default=None, ge=1, le=4096,
        description="Resize every image to N x N (1-4096); none = the images' own size (they must all have one).",
    )
    val_size: int | None = Field(
        title="1 Experiment · validation images",
        default=None,
        ge=1,
        description="Images held out of the training images for validation (>= 1, leaving at least one "
        "to train on); none = one sixth of them (10,000 of the 60k built-ins). Not with a val/ folder.",
    )
    split_seed: int = Field(
        title="1 Experiment · split seed",
        default=0,
        ge=0,
        description="Seed of the train/validation split (the same for every trial).",
    )
    train_limit: int | None = Field(
        title="1 Experiment · training images limit (smoke runs)",
        default=None,
        ge=1,
        description="Train on at most this many images (>= 1; smoke runs, marked as such in the report); none = all.",
    )
    num_workers: int = Field(
        title="1 Experiment · data loader workers",
        default=2, ge=0, le=64,
        description="Worker processes that decode an image folder the first time (4,096 files or more) and "
        "read a Dataset too large for memory (0-64; 0 = in the process itself).",
    )

    # --- search -------------------------------------------------------------------------------
    search: Literal["grid", "asha", "tpe"] = Field(
        default="grid",
        title="2 Search · method",
        description="grid: every learning rate for every epoch; asha: successive halving over epochs "
        "(rungs at grace_epochs x reduction_factor^k); tpe: Optuna TPE over lr_range, trials rates, "
        "stopped at the same rungs.",
    )
    grace_epochs: int = Field(default=1, ge=1, le=1000, title="2 Search · grace epochs",
                              description="First rung of asha/tpe: epochs every trial gets (1-1000).")
    reduction_factor: int = Field(default=3, ge=2, le=16, title="2 Search · reduction factor",
                                  description="asha/tpe keep the best 1/reduction_factor at each rung (2-16).")
    lr_range: list[float] = Field(default=[1e-4, 1e-2], title="2 Search · learning-rate range",
                                  description="tpe: MIN MAX of the log-uniform learning rate (0 < MIN < MAX <= 100).")
    trials: int = Field(default=9, ge=1, le=256, title="2 Search · trials",
                        description="tpe: learning rates to try in all (1-256).")
    optuna_storage: str | None = Field(
        default=None, title="2 Search · Optuna storage",
        description="tpe: the study's database URL (postgresql://... for trials on several nodes); "
        "none = sqlite in OUTPUT_DIR/optuna.db. The same command resumes the same study.")
    auto_factors: list[float] = Field(default=[0.3, 1.0, 3.0], title="2 Search · auto factors",
                                      description="learning_rates 'auto': multiples of the range test's "
                                      "suggestion to try (1-16 values > 0).")
    min_lr: float = Field(default=1e-7, gt=0, le=100, title="2 Search · range test min lr",
                          description="LR range test: first learning rate (> 0).")
    max_lr: float = Field(default=10.0, gt=0, le=1000, title="2 Search · range test max lr",
                          description="LR range test: last learning rate (> min_lr).")

    # --- selection and promotion ------------------------------------------------------------
    selection_metric: Literal["val_accuracy", "val_loss"] = Field(
        title="2 Selection · metric",
        default="val_accuracy", description="Metric that picks the best trial."
    )
    alias: str = Field(
        title="2 Promotion · alias", default="production",
        description="Alias given to the winning model: letters, digits, '_', '.', '-' (not 'latest' or a version name like 'v3').")
    promotion_margin: float = Field(
        title="2 Promotion · margin",
        default=0.0,
        ge=0.0,
        le=1.0,
        description="The challenger must beat the alias holder's test accuracy by more than "
        "this to take the alias (0-1).",
    )

    # --- where it runs ----------------------------------------------------------------------
    device: str = Field(
        title="3 Infrastructure · device", default="auto", description="auto (every GPU, else the CPU), cpu, cuda or cuda:N.")
    trials_per_device: int = Field(
        title="3 Infrastructure · trials per device",
        default=1,
        ge=1,
        le=64,
        description="Trials that share one GPU at the same time (1-64; the CPU runs trials one by one).",
    )
    dispatch: Literal["local", "deployment"] = Field(
        title="3 Infrastructure · dispatch",
        default="local",
        description="local: trials run in the sweep's own flow run; deployment: each trial is a "
        "flow run of TRIAL_DEPLOYMENT, taken by any worker of its pool (several nodes).",
    )
    trial_deployment: str | None = Field(
        title="3 Infrastructure · trial deployment",
        default=None,
        description="Per-trial deployment (lr-sweep-trial/NAME) used when dispatch is 'deployment'; "
        "none = the lr-sweep-trial deployment on the sweep's own work pool.",
    )

    dispatch_timeout_minutes: float = Field(
        title="3 Infrastructure · dispatch timeout (minutes)",
        default=120.0,
        gt=0,
        le=10080,
        description="With dispatch 'deployment': how long the sweep waits for its trial runs "
        "(0-10080 minutes); runs not finished by then are cancelled and reported as failed.",
    )

    trial_retries: int = Field(
        title="3 Infrastructure · trial retries",
        default=2,
        ge=0,
        le=10,
        description="With dispatch 'deployment': how many times a trial run that crashed or was "
        "lost (its process, worker or machine died) is submitted again, resuming from its last "
        "checkpoint (0-10; a trial that failed or diverged on its own is never re-run).",
    )

    # --- tracking and storage -----------------------------------------------------------------
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        title="4 Tracking · W&B mode",
        default="offline", description="W&B mode; online needs WANDB_API_KEY."
    )
    wandb_project: str = Field(
        title="4 Tracking · W&B project", default="lr-sweep", min_length=1, description="W&B project.")
    wandb_entity: str | None = Field(
        title="4 Tracking · W&B entity", default=None, description="W&B entity (team or user).")
    wandb_registry_collection: str | None = Field(
        title="4 Tracking · W&B Registry collection",
        default=None,
        description="W&B Registry collection (e.g. wandb-registry-model/fashion-mnist-cnn) where "
        "the promoted model is also linked with the alias; none = no link.",
    )
    registry: Literal["local", "wandb"] = Field(
        title="4 Storage · registry backend",
        default="local", description="Model registry backend."
    )
    collection: str | None = Field(
        title="4 Storage · registry collection", default=None,
        description="Registry collection of the sweep's models; none = DATASET-MODEL (e.g. fashion-mnist-cnn, "
        "my-folder-resnet18).")
    registry_dir: Path = Field(
        title="4 Storage · registry directory",
        default=Path("registry"), description="Directory of the local model registry."
    )
    data_dir: Path = Field(
        title="4 Storage · data directory", default=Path("data"), description="Dataset cache directory.")
    output_dir: Path = Field(
        title="4 Storage · output directory",
        default=Path("runs"),
        description="Sweep outputs go to OUTPUT_DIR/SWEEP_ID (report, charts, W&B runs).",
    )
    sweep_id: str | None = Field(
        title="4 Storage · sweep id",
        default=None, description="Name of this sweep; generated when not given."
    )

    # --- validators -------------------------------------------------------------------------
    @field_validator("learning_rates", mode="before")
    @classmethod
    def _auto(cls, rates):
        # `--learning-rates auto` arrives as ["auto"], LR_SWEEP_LEARNING_RATES=auto as "auto".
        return "auto" if rates == ["auto"] else rates

    @field_validator("learning_rates")
    @classmethod
    def _check_learning_rates(cls, rates: list[float] | str) -> list[float] | str:
        if rates == "auto":
            return rates
        if not rates:
            raise ValueError("give at least one learning rate")
        if len(rates) > MAX_LEARNING_RATES:
            raise ValueError(f"at most {MAX_LEARNING_RATES} learning rates, got {len(rates)}")
        for rate in rates:
            if not math.isfinite(rate) or rate <= 0 or rate > 100:
                raise ValueError(f"{rate!r} is not allowed: each rate must be finite, > 0 and <= 100")
        if len(set(rates)) != len(rates):
            raise ValueError(f"learning rates must be unique, got {rates}")
        return rates

    @field_validator("learning_rates")
    @classmethod
    def _check_rate_names(cls, rates: list[float] | str) -> list[float] | str:
        # A trial is named by its rate to six significant digits (W&B run, alias, checkpoint
        # folder): two rates that agree there would overwrite each other's trial.
        if rates != "auto" and (shared := rates_sharing_a_name(rates)):
            raise ValueError("learning rates that agree to 6 significant digits would share a trial name: "
                             + "; ".join(f"{', '.join(map(repr, group))} -> lr{name[2:]}" for name, group in shared.items())
                             + "; give rates that differ within 6 digits")
        return rates

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("give at least one seed")
        if len(seeds) > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS} seeds, got {len(seeds)}")
        if any(seed < 0 or seed >= 2**31 for seed in seeds):
            raise ValueError(f"seeds must be in [0, 2**31), got {seeds}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be unique, got {seeds}")
        return seeds

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, spec: str) -> str:
        parse_dataset_spec(spec)  # the form only: the folder or the module is checked before training
        return spec

    @field_serializer("optuna_storage")
    def _mask_storage(self, url: str | None) -> str | None:
        # Every dump of the config (summary.json, the trial runs' Prefect parameters, --dry-run)
        # shows the storage without its password; the object keeps it for the run itself.
        from tasks.search.tpe import masked_url

        return None if url is None else masked_url(url)

    @field_validator("alias")
    @classmethod
    def _check_alias(cls, alias: str) -> str:
        return check_name("alias", alias)

    @field_validator("sweep_id")
    @classmethod
    def _check_sweep_id(cls, sweep_id: str | None) -> str | None:
        return None if sweep_id is None else check_name("sweep_id", sweep_id)

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
                "ORG/ before it), letters, digits, '_', '.', '-'"
            )
        return path

    @field_validator("trial_deployment")
    @classmethod
    def _check_trial_deployment(cls, name: str | None) -> str | None:
        if name is not None and not TRIAL_DEPLOYMENT_PATTERN.fullmatch(name):
            raise ValueError(
                f"{name!r} is not allowed: name a deployment of the per-trial flow as "
                "lr-sweep-trial/NAME, e.g. lr-sweep-trial/trial-gpu or lr-sweep-trial/trial-local"
            )
        return name

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        # Whether this machine has that GPU is the pre-flight's question (flows/preflight.py):
        # a GPU deployment's config validates on a laptop too.
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"{device!r} is not allowed: use auto, cpu, cuda or cuda:N")
        return device

    @field_validator("model")
    @classmethod
    def _check_model(cls, spec: str) -> str:
        source_kind(spec)  # the spec's form only; importing it is the pre-flight's
        return spec

    @field_validator("model_args", mode="before")
    @classmethod
    def _parse_model_args(cls, value):
        if isinstance(value, str):  # --model-args '{"width": 64}'
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"not JSON ({error.msg}): give a JSON object, e.g. {{\"width\": 64}}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a JSON object: give one, e.g. {{\"width\": 64}}")
        return value

    @field_validator("collection")
    @classmethod
    def _check_collection(cls, name: str | None) -> str | None:
        return None if name is None else check_name("collection", name)

    @field_validator("lr_range")
    @classmethod
    def _check_lr_range(cls, bounds: list[float]) -> list[float]:
        if len(bounds) != 2:
            raise ValueError(f"{bounds!r} is not allowed: give MIN MAX with 0 < MIN < MAX <= 100")
        check_lr_range(*bounds, names=("lr_range MIN", "lr_range MAX"), upper=100)
        return bounds

    @field_validator("auto_factors")
    @classmethod
    def _check_auto_factors(cls, factors: list[float]) -> list[float]:
        if not 1 <= len(factors) <= 16 or not all(math.isfinite(f) and f > 0 for f in factors) \
                or len(set(factors)) != len(factors):
            raise ValueError(f"{factors!r} is not allowed: 1-16 unique values, each finite and > 0")
        return factors

    @model_validator(mode="after")
    def _check_combination(self) -> SweepConfig:
        check_lr_range(self.min_lr, self.max_lr)
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

    def trial_grid(self, learning_rates: list[float] | None = None) -> list[tuple[float, int]]:
        """(learning rate, seed) pairs in a fixed order: rates as given, then seeds. With
        learning_rates 'auto' the rates come from the range test, passed in here."""
        rates = self.learning_rates if learning_rates is None else learning_rates
        if rates == "auto":
            raise ValueError("learning_rates 'auto': the rates come from the LR range test")
        return [(rate, seed) for rate in rates for seed in self.seeds]


def _is_union_branch(part) -> bool:
    # pydantic names the member of a union a value failed in the location: list[float], literal['auto']
    return isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "bool"))


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
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.setdefault(field.split("[")[0] if any(map(_is_union_branch, problem["loc"])) else field, []).append(
            f"{message}{shown}")
    return "\n".join(f"{field}: {' - or - '.join(messages)}" for field, messages in lines.items())
