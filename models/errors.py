"""The project's own errors, in a module that imports nothing heavy (the CLI names them before
torch is loaded).

Two kinds, and the CLI treats them differently (flows/cli.py main()):
- `InputError`: something the user gave is not allowed (a name, a field, a model that is not
  there). Exit 2, "invalid input", the field named.
- `RegistryError`: stored state cannot be used as it is (a digest that does not match, a corrupt
  table, an alias that moved). Exit 1, one line that names what and where.
Anything else is a bug: it keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input the project found itself; `field` is the one to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # Prefect copies and pickles exceptions that cross a task: keep `field`
        return type(self), (self.field, str(self))


class RegistryError(Exception):
    """Base class of the registry's own errors."""


class ModelNotFound(RegistryError, LookupError):
    pass


class DigestMismatch(RegistryError):
    """A stored version's files, or the version a name points to, do not match the digest the
    caller holds: it is refused, never loaded or promoted."""


class AliasConflict(RegistryError):
    """The alias moved since the caller looked at it: its decision must be made again."""


class CorruptState(RegistryError):
    """A file the registry keeps cannot be read; the message names it."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path} is corrupt ({problem}); restore it from a backup, or move it away "
                         "if what it held can be given up")
        self.path = Path(path)
