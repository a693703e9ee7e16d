"""The one rule for every name that becomes part of a path or a W&B name.

Sweep ids, collections, aliases and versions all end up as folder names (the local registry,
the output directory) or W&B artifact names. A name must match SAFE_NAME as a whole string
(`re.fullmatch`, so a trailing newline does not slip through as it does with `^...$` and
`re.match`): it starts with a letter or digit, so `.`, `..` and hidden names are impossible, and
it holds no `/` or `:`. Each kind adds its reserved names. After that, `inside` checks that the
joined path really lies within its root, so no future change of the pattern can open a way out.
"""

from __future__ import annotations

import re
from pathlib import Path

from models.errors import InputError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
SAFE_NAME_TEXT = "letters, digits, '_', '.', '-', starting with a letter or digit (no '/', ':' or spaces)"
VERSION_NAME = re.compile(r"v(\d+)")
LATEST = "latest"
# Folders the sweep itself keeps beside the sweeps in the output directory.
RESERVED_SWEEP_IDS = frozenset({"checkpoints", "wandb", "prefect-results", "exports"})
# W&B's own limit for project names is 128 characters; entities (users, teams) are shorter.
MAX_LENGTH = {"sweep_id": 96, "collection": 128, "alias": 128, "version": 16, "wandb_project": 128,
              "wandb_entity": 64}


class NameNotAllowed(InputError):
    """A name that would not stay in its folder (or is kept by the registry); `kind` is the
    field it was given for."""

    @property
    def kind(self) -> str:
        return self.field


def trial_name(learning_rate: float, seed: int) -> str:
    """The one spelling of a trial's name: task runs, W&B runs and aliases, folders, logs.

    Six significant digits (`%g`) keep names readable; two rates that agree in those digits
    would share every name, so a sweep's rates are refused when they do (flows/config.py)."""
    return f"lr{learning_rate:g}-seed{seed}"


def rates_sharing_a_name(rates) -> dict[str, list[float]]:
    """The trial names that more than one of `rates` would get (any seed: the rate part)."""
    named: dict[str, list[float]] = {}
    for rate in rates:
        named.setdefault(trial_name(rate, 0).removesuffix("-seed0"), []).append(rate)
    return {name: group for name, group in named.items() if len(group) > 1}


def check_name(kind: str, name: str) -> str:
    """`name` if it is a valid `kind` (sweep_id, collection, alias, version, wandb_project,
    wandb_entity), else NameNotAllowed naming the kind, the value and what is allowed."""
    limit = MAX_LENGTH[kind]
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or len(name) > limit:
        raise NameNotAllowed(kind, f"{name!r} is not allowed as {kind}: 1-{limit} characters of {SAFE_NAME_TEXT}")
    if kind == "version" and not VERSION_NAME.fullmatch(name):
        raise NameNotAllowed(kind, f"{name!r} is not allowed as version: v0, v1, ...")
    if kind == "alias" and (name == LATEST or VERSION_NAME.fullmatch(name)):
        raise NameNotAllowed(kind, f"{name!r} is not allowed as alias: not 'latest' or a version name "
                         "like 'v3' (the registry keeps those names)")
    if kind == "sweep_id" and name in RESERVED_SWEEP_IDS:
        raise NameNotAllowed(kind, f"{name!r} is not allowed as sweep_id: reserved for the output directory's "
                         f"own folders ({', '.join(sorted(RESERVED_SWEEP_IDS))})")
    return name


def inside(root: Path, *names: str) -> Path:
    """root/names..., refused unless it resolves inside root (symlinks included)."""
    base = Path(root).resolve()
    path = base.joinpath(*names).resolve()
    if path != base and base not in path.parents:
        # A name (or a symlink in its place) that would leave its root: refused like a bad name.
        raise NameNotAllowed("path", f"{'/'.join(names)!r} leads outside {base}")
    return path
