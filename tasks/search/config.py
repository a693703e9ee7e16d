"""The grid (which rates and seeds a sweep trains) and the search group (how far each trains:
successive halving, TPE, the LR range test), owned by the search algorithms."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from models.config_group import ConfigGroup
from models.names import rates_sharing_a_name
from tasks.search.checks import check_lr_range

MAX_LEARNING_RATES = 64
MAX_SEEDS = 32


def masked_url(url: str) -> str:
    """The URL with its password replaced by ***: what is shown and stored of a storage URL (the
    password itself lives in the URL given at run time, or in the environment: PGPASSWORD)."""
    try:
        from sqlalchemy.engine import make_url  # only where a storage is shown: not at `--help`

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


class GridConfig(ConfigGroup):
    SECTION = "1 Experiment"

    learning_rates: list[float] | Literal["auto"] = Field(
        title="learning rates", default=[0.001, 0.0005, 0.0001],
        description="Learning rates to try, one trial per rate and seed: 1-64 unique values, each > 0 and <= 100; "
        "'auto' runs the LR range test first and tries auto_factors x its suggestion.")
    seeds: list[int] = Field(
        title="seeds", default=[0],
        description="Seeds; every learning rate is trained once per seed: 1-32 unique values in [0, 2**31).")

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
        # A trial is named by its rate to six significant digits (W&B run, alias, checkpoint
        # folder): two rates that agree there would overwrite each other's trial.
        if shared := rates_sharing_a_name(rates):
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

    def trial_grid(self, learning_rates: list[float] | None = None) -> list[tuple[float, int]]:
        """(learning rate, seed) pairs in a fixed order: rates as given, then seeds. With
        learning_rates 'auto' the rates come from the range test, passed in here."""
        rates = self.learning_rates if learning_rates is None else learning_rates
        if rates == "auto":
            raise ValueError("learning_rates 'auto': the rates come from the LR range test")
        return [(rate, seed) for rate in rates for seed in self.seeds]


class SearchMethod(ConfigGroup):
    SECTION = "2 Search"

    search: Literal["grid", "asha", "tpe"] = Field(
        title="method", default="grid",
        description="grid: every learning rate for every epoch; asha: successive halving over epochs "
        "(rungs at grace_epochs x reduction_factor^k); tpe: Optuna TPE over lr_range, trials rates, "
        "stopped at the same rungs.")


class HalvingFields(ConfigGroup):
    """The rungs, shared by asha and tpe."""

    SECTION = "2 Search"

    grace_epochs: int = Field(title="grace epochs", default=1, ge=1, le=1000,
                              description="First rung of asha/tpe: epochs every trial gets (1-1000).")
    reduction_factor: int = Field(title="reduction factor", default=3, ge=2, le=16,
                                  description="asha/tpe keep the best 1/reduction_factor at each rung (2-16).")


class TPEFields(ConfigGroup):
    SECTION = "2 Search"

    lr_range: list[float] = Field(title="learning-rate range", default=[1e-4, 1e-2],
                                  description="tpe: MIN MAX of the log-uniform learning rate (0 < MIN < MAX <= 100).")
    trials: int = Field(title="trials", default=9, ge=1, le=256, description="tpe: learning rates to try in all (1-256).")
    optuna_storage: str | None = Field(
        title="Optuna storage", default=None,
        description="tpe: the study's database URL (postgresql://... for trials on several nodes); "
        "none = sqlite in OUTPUT_DIR/optuna.db. The same command resumes the same study.")

    @field_serializer("optuna_storage")
    def _mask_storage(self, url: str | None) -> str | None:
        # Every dump of the config (summary.json, the trial runs' Prefect parameters, --dry-run)
        # shows the storage without its password; the object keeps it for the run itself.
        return None if url is None else masked_url(url)

    @field_validator("lr_range")
    @classmethod
    def _check_lr_range(cls, bounds: list[float]) -> list[float]:
        if len(bounds) != 2:
            raise ValueError(f"{bounds!r} is not allowed: give MIN MAX with 0 < MIN < MAX <= 100")
        check_lr_range(*bounds, names=("lr_range MIN", "lr_range MAX"), upper=100)
        return bounds


class RangeTestFields(ConfigGroup):
    """The LR range test's (`lr-sweep find`, learning_rates 'auto')."""

    SECTION = "2 Search"

    auto_factors: list[float] = Field(title="auto factors", default=[0.3, 1.0, 3.0],
                                      description="learning_rates 'auto': multiples of the range test's "
                                      "suggestion to try (1-16 values > 0).")
    min_lr: float = Field(title="range test min lr", default=1e-7, gt=0, le=100,
                          description="LR range test: first learning rate (> 0).")
    max_lr: float = Field(title="range test max lr", default=10.0, gt=0, le=1000,
                          description="LR range test: last learning rate (> min_lr).")

    @field_validator("auto_factors")
    @classmethod
    def _check_auto_factors(cls, factors: list[float]) -> list[float]:
        if not 1 <= len(factors) <= 16 or not all(math.isfinite(f) and f > 0 for f in factors) \
                or len(set(factors)) != len(factors):
            raise ValueError(f"{factors!r} is not allowed: 1-16 unique values, each finite and > 0")
        return factors

    @model_validator(mode="after")
    def _check_range_test(self):
        check_lr_range(self.min_lr, self.max_lr)
        return self


# `lr-sweep find` offers these with the experiment's fields.
RANGE_TEST_FIELDS = tuple(RangeTestFields.model_fields)


# pydantic lists the bases' fields last to first: the method, the rungs, TPE's, the range test's.
class SearchConfig(RangeTestFields, TPEFields, HalvingFields, SearchMethod):
    """How far each trial trains and which rates a search proposes: each kind's fields."""
