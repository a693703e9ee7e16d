"""The form of a model source spec, read from its text alone: no torch, no import of user code,
so SweepConfig can validate it and `lr-sweep --help` stays fast (models/sources.py builds)."""

from __future__ import annotations

from models.user_code import SourceError, is_code_spec, parse_code_spec

CNN = "cnn"  # models/cnn.py's ARCHITECTURE_NAME, without importing torch
TORCHVISION_PREFIX = "torchvision:"
FIELD = "model"
ARGS_FIELD = "model_args"


def source_kind(spec: str) -> str:
    """'cnn', 'torchvision' or 'user', from the spec's text alone (validation stays pure)."""
    if spec == CNN:
        return "cnn"
    if spec.startswith(TORCHVISION_PREFIX) and spec[len(TORCHVISION_PREFIX):].isidentifier():
        return "torchvision"
    if is_code_spec(spec):
        return "user"
    raise SourceError(FIELD, f"{spec!r} is not a model source: use cnn, torchvision:NAME (e.g. "
                             "torchvision:resnet18), package.module:function or path/to/file.py:function")


def short_name(spec: str) -> str:
    """The model's part of a registry collection name: cnn, resnet18, or the user's function."""
    kind = source_kind(spec)
    if kind == "cnn":
        return CNN
    if kind == "torchvision":
        return spec[len(TORCHVISION_PREFIX):]
    return parse_code_spec(spec, FIELD).function
