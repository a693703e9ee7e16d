"""The base of every configuration group: a frozen pydantic model whose fields are flat names users
know (`--epochs`, `LR_SWEEP_EPOCHS`, `epochs = 5` in a preset).

Each group lives with the code that uses it (training, data, model, search, ...); `SweepConfig`
(flows/config.py) composes them, and `Group.of(config)` takes a group back out of it as its own
object, which is what a step is handed (a TrialSpec embeds its training and model groups).
`SECTION` is where the group's fields appear in the CLI's help and the Prefect UI's run form.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class ConfigGroup(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    SECTION: ClassVar[str] = ""  # "1 Experiment": the form's order number and the section's name

    @classmethod
    def of(cls, config: BaseModel):
        """This group's fields of a validated config (or of any model holding them)."""
        return cls.model_construct(**{name: getattr(config, name) for name in cls.model_fields})
