"""What `--dataset` may say, read without touching the disk or importing anything.

The config validates a spec with `parse_dataset_spec` alone (validators stay pure: whether the
folder exists or the module imports is the data step's question, asked before training). This
module imports no torch, so `lr-sweep --help` and a bad flag answer at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from models.errors import InputError
from models.user_code import FILE_SPEC, is_code_spec

BUILTIN_DATASETS = ("fashion-mnist", "mnist", "kmnist")
IMAGEFOLDER_PREFIX = "imagefolder:"
ALLOWED_FORMS = ("fashion-mnist, mnist, kmnist, imagefolder:PATH, package.module:function "
                 "or path/to/file.py:function")


class DatasetError(RuntimeError):
    """The dataset cannot be found or its files are corrupt: a clear error before training."""


class DatasetInputError(DatasetError, InputError):
    """The data the user named is not usable as given (no train/ folder, mixed image sizes, a
    function that returns something else): bad input, refused before training, one line.
    `field` is the config field to fix (`dataset`, `image_size`, `val_size`); as an InputError
    the CLI answers it with exit 2 naming that field."""

    def __init__(self, field: str, message: str):
        InputError.__init__(self, field, message)


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed `--dataset`: `kind` and its `target` (the built-in's name, the folder, or the
    `module:function` / `file.py:function` text as given)."""

    kind: Literal["builtin", "imagefolder", "function"]
    target: str


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """The spec's kind; ValueError naming the allowed forms for anything else."""
    if spec in BUILTIN_DATASETS:
        return DatasetSpec("builtin", spec)
    if spec.startswith(IMAGEFOLDER_PREFIX):
        path = spec[len(IMAGEFOLDER_PREFIX):]
        if not path.strip() or "\n" in path or "\x00" in path:
            raise ValueError(f"{spec!r} is not allowed: imagefolder:PATH needs the folder's path")
        return DatasetSpec("imagefolder", path)
    if is_code_spec(spec):  # the same rule as a model's (models/user_code.py)
        return DatasetSpec("function", spec)
    raise ValueError(f"{spec!r} is not allowed: use {ALLOWED_FORMS}")


def dataset_label(spec: str) -> str:
    """A short name of the data, fit for a registry collection name (letters, digits, '_', '.',
    '-'): the built-in's name, the image folder's name, or the module (file) and function."""
    parsed = parse_dataset_spec(spec)
    if parsed.kind == "builtin":
        return spec
    if parsed.kind == "imagefolder":
        label, fallback = os.path.basename(os.path.abspath(os.path.expanduser(parsed.target))), "imagefolder"
    else:
        target, _, function = spec.rpartition(":")
        stem = os.path.splitext(os.path.basename(target))[0] if FILE_SPEC.fullmatch(spec) else target.rsplit(".", 1)[-1]
        label, fallback = f"{stem}-{function}", "dataset"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", label).strip("-.")[:64] or fallback
