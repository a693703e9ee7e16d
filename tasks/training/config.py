"""The training group (what shapes one trial's optimisation) and the devices group (where trials
train), owned by the training code that reads them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from models.config_group import ConfigGroup
from tasks.training.schedules import SCHEDULES
from tasks.training.schedules.step import StepFields

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:\d+")
PACK_LIMIT = 256  # a sweep's most trials (tpe's `trials`)
SCHEDULE_NAMES = tuple(SCHEDULES)


class TrainingCore(ConfigGroup):
    SECTION = "1 Experiment"

    epochs: int = Field(title="epochs", default=5, ge=1, le=1000, description="Training epochs per trial (1-1000).")
    batch_size: int = Field(title="batch size", default=64, ge=1, le=65536, description="Training batch size (1-65536).")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        title="optimizer", default="adam", description="Optimizer (sgd uses momentum 0.9).")
    lr_schedule: Literal[SCHEDULE_NAMES] = Field(
        title="learning-rate schedule", default="constant",
        description="Per-batch schedule of each trial's rate: constant, cosine (to 0 over the epochs), "
        "onecycle (the trial's rate is the peak, as fastai's fit_one_cycle) or step (times lr_step_factor "
        "every lr_step_epochs epochs).")
    warmup_epochs: float = Field(
        title="warmup epochs", default=0.0, ge=0, le=1000,
        description="Linear warmup from 0 to the trial's rate over this many epochs (0-1000, may be a "
        "fraction; onecycle: its rising phase, 0 = 30% of the epochs).")
    weight_decay: float | None = Field(
        title="weight decay", default=None, ge=0, le=10,
        description="Optimizer weight decay (0-10; decoupled with adamw); none = the optimizer's default "
        "(adamw 0.01, adam and sgd 0).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        title="precision", default="fp32",
        description="Training precision: fp32, bf16 autocast (CPU and GPU) or fp16 autocast with a "
        "gradient scaler; evaluation is fp32.")


# Each schedule's own fields join the group as a base (pydantic lists the bases' fields in reverse
# order, so the core's come first).
class TrainingConfig(StepFields, TrainingCore):
    """Everything that shapes one trial's training but its learning rate and seed."""


class DevicesConfig(ConfigGroup):
    """Where trials train, and how the engine runs them there (packs, CUDA graphs, determinism)."""

    SECTION = "3 Infrastructure"

    device: str = Field(
        title="device", default="auto", description="auto (every GPU, else the CPU), cpu, cuda or cuda:N.")
    trials_per_device: int = Field(
        title="trials per device", default=1, ge=1, le=64,
        description="Trials that share one GPU at the same time (1-64; the CPU runs trials one by one).")
    pack: Literal["auto", "off"] | int = Field(
        title="pack", default="auto",
        description="Trials that differ only in learning rate, seed, warmup or weight decay train together "
        "in one engine call: auto = as many as a GPU takes (up to 32), one at a time on a CPU; off; or N "
        "(>= 2) per pack, on a CPU too.")
    cuda_graphs: Literal["auto", "off"] = Field(
        title="CUDA graphs", default="auto",
        description="auto: on CUDA a trial's (or a pack's) training step is captured once and replayed "
        "(fp32 and bf16; fp16 and models that cannot be captured train eager); off: eager.")
    deterministic: bool = Field(
        title="deterministic", default=True,
        description="Deterministic algorithms (cuDNN, cuBLAS): the same trial on the same machine and "
        "software gives the same weights, packed or not, resumed or not; recorded with every model.")

    @field_validator("pack")
    @classmethod
    def _check_pack(cls, pack: str | int) -> str | int:
        if isinstance(pack, int) and not 2 <= pack <= PACK_LIMIT:
            raise ValueError(f"{pack!r} is not allowed: use auto, off or a number of trials per pack from 2 "
                             f"to {PACK_LIMIT}")
        return pack

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        # Whether this machine has that GPU is the pre-flight's question (flows/preflight.py):
        # a GPU deployment's config validates on a laptop too.
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"{device!r} is not allowed: use auto, cpu, cuda or cuda:N")
        return device
