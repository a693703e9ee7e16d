"""The model group of the configuration: which network a trial trains."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from models.config_group import ConfigGroup
from models.source_spec import source_kind

if TYPE_CHECKING:
    from models.sources import ModelSource


# Builder arguments are a few sizes and names; past this depth they are a mistake, and recording,
# hashing and printing them would recurse past Python's stack.
MAX_ARGS_DEPTH = 32


def nesting(value) -> int:
    """How deep lists and dicts nest in `value` (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_ARGS_DEPTH:  # enough to know it is too deep
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class ModelConfig(ConfigGroup):
    SECTION = "1 Experiment"

    model: str = Field(
        title="model", default="cnn",
        description="The network: cnn (the reference CNN), torchvision:NAME (e.g. torchvision:resnet18, "
        "weights=None), package.module:function or path/to/file.py:function (called with num_classes, "
        "in_channels, image_size and model_args; returns a torch.nn.Module).")
    model_args: dict[str, Any] = Field(
        title="model arguments", default={},
        description='Keyword arguments of the model\'s builder, a JSON object (e.g. {"width": 64}); '
        "recorded with every model.")
    hidden_units: int = Field(
        title="hidden units", default=128, ge=1, le=65536, description="Units in the CNN's hidden layer (1-65536).")

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
            except RecursionError:  # deeper than the parser's stack: far past the limit below
                raise ValueError(f"nested deeper than {MAX_ARGS_DEPTH} levels: give a flatter JSON object") from None
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a JSON object: give one, e.g. {{\"width\": 64}}")
        if nesting(value) > MAX_ARGS_DEPTH:
            raise ValueError(f"nested deeper than {MAX_ARGS_DEPTH} levels: give a flatter JSON object")
        return value

    def source(self) -> ModelSource:
        """The model source this group names: the one place a ModelSource is made from a config."""
        from models.sources import ModelSource  # torch: not for `--help` or a config check

        return ModelSource(spec=self.model, args=self.model_args, hidden_units=self.hidden_units)
