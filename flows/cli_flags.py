"""The CLI's flags, generated from SweepConfig: one per field (the field's name with dashes), in
the help group of its config group, "(default: X)" from the field; a preset file (--config) read into
the same fields. Flags, defaults and help can never drift from the config."""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path

from flows.config import SECTION_OF, SweepConfig
from models.config import ModelConfig
from models.errors import InputError
from tasks.data.config import DataConfig
from tasks.reporting.config import StorageConfig, TrackingConfig
from tasks.search.config import RANGE_TEST_FIELDS, GridConfig
from tasks.training.config import TrainingConfig

PRESET_HELP = ("a preset: a .toml or .yaml file of SweepConfig fields (examples/*.toml); the flags given "
               "override it, and it overrides LR_SWEEP_* variables")

def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    return parse


# What `find` (the range test alone) does not use: the grid, the registry, where models go.
NOT_FOR_FIND = {"learning_rates", "epochs", "collection", "registry", "registry_dir", "wandb_registry_collection"}
FIND_GROUPS = (GridConfig, TrainingConfig, ModelConfig, DataConfig, TrackingConfig, StorageConfig)


# What rebuilds a stored model and reads its test set: a command that does (promote, publish)
# takes these flags as `run` does, so that it may import the user code and read the data they name.
REBUILD_GROUPS = (ModelConfig, DataConfig)


def rebuild_fields(*leave_out: str) -> list[str]:
    """The flags of the model and data groups, in SweepConfig's order."""
    wanted = {name for group in REBUILD_GROUPS for name in group.model_fields} - set(leave_out)
    return [name for name in SweepConfig.model_fields if name in wanted]


def help_group(name: str) -> str:
    """The help's group of a field: its config group's section, without its number."""
    return SECTION_OF[name].split(" ", 1)[1]


def find_fields() -> list[str]:
    """The range test's flags: the experiment, tracking and storage fields a range test uses,
    its own (min_lr, max_lr, auto_factors) and the device."""
    wanted = {name for group in FIND_GROUPS for name in group.model_fields if name not in NOT_FOR_FIND}
    wanted |= set(RANGE_TEST_FIELDS) | {"device"}
    return [name for name in SweepConfig.model_fields if name in wanted]


def add_config_arguments(parser: argparse.ArgumentParser, names: typing.Iterable[str] | None = None) -> None:
    """One flag per SweepConfig field (or per field in `names`), in the help group of its config group;
    values are validated by SweepConfig itself."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names or SweepConfig.model_fields:
        field = SweepConfig.model_fields[name]
        group = help_group(name)
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        default = field.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else json.dumps(default) if isinstance(default, dict) else default
        help_text = field.description
        options: dict = {"default": argparse.SUPPRESS, "dest": name}
        lists = [a for a in (args if origin in (typing.Union, types.UnionType) else (annotation,))
                 if typing.get_origin(a) is list]
        if lists:  # a list, or a list or a keyword (learning_rates: FLOAT ... or 'auto')
            item = typing.get_args(lists[0])[0].__name__.upper()
            keywords = [k for a in args if typing.get_origin(a) is typing.Literal for k in typing.get_args(a)]
            options.update(nargs="+", metavar=item if not keywords else f"{item}|{'|'.join(keywords)}")
        elif origin is typing.Literal:
            help_text += f" Allowed: {', '.join(args)}."
            options.update(metavar="{" + ",".join(args) + "}")
        elif origin in (typing.Union, types.UnionType) and type(None) not in args:
            # a keyword or a number (pack: auto, off or N): SweepConfig tells them apart
            keywords = [k for a in args if typing.get_origin(a) is typing.Literal for k in typing.get_args(a)]
            numbers = [{int: "N", float: "X"}[a] for a in args if a in (int, float)]
            options.update(metavar="{" + ",".join(keywords + numbers) + "}")
        elif origin in (typing.Union, types.UnionType):
            options.update(type=_none_or(str), metavar="VALUE|none")
        elif annotation is bool:
            options.update(action=argparse.BooleanOptionalAction)
        help_text = f"{help_text} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        groups[group].add_argument(flag(name), help=help_text, **options)


def parse_config(namespace: argparse.Namespace) -> SweepConfig:
    """The config from the given flags, then the preset file (--config), then LR_SWEEP_*
    variables, then SweepConfig's defaults."""
    given = {name: getattr(namespace, name) for name in SweepConfig.model_fields if hasattr(namespace, name)}
    preset = read_preset(namespace.config) if getattr(namespace, "config", None) else {}
    return SweepConfig(**(preset | given))


def read_preset(path: str) -> dict:
    """A preset (nanoGPT's config/*.py, as TOML or YAML): a table whose keys are SweepConfig
    fields, e.g. `epochs = 1`; SweepConfig refuses unknown keys and bad values, naming them."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise InputError("config", f"cannot read {path}: {error.strerror}") from None
    if file.suffix not in (".toml", ".yaml", ".yml"):
        raise InputError("config", f"{path}: use a .toml or .yaml file")
    import tomllib
    import yaml

    try:
        values = tomllib.loads(text) if file.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise InputError("config", f"{path} is not valid {file.suffix[1:].upper()}: {error}") from None
    if not isinstance(values, dict):
        raise InputError("config", f"{path} must hold a table of SweepConfig fields, not {type(values).__name__}")
    return values
