"""User code named by a spec: `package.module:function` or `path/to/file.py:function`.

A model factory or a dataset function of the user's is found here, and nowhere else. Two rules:

- A file is loaded with importlib under a module name of its own (`lr_sweep_user.<stem>_<hash>`),
  and its folder is not put on `sys.path`: a user's `models/` or `tasks/` folder next to the file
  never shadows ours, and ours never shadows theirs.
- Code is imported only when the running command's own configuration names it. The digest of the
  code (`code_digest`) is computed from the files, without importing them, so a caller can refuse
  a mismatch before any of that code runs.

The code digest of a file is the SHA-256 of the file and of every `.py` file of the package it
sits in (the folders above it that hold an `__init__.py`); of a module, the same over its
top-level package (or its single file).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from models.errors import InputError

# module.path:function or some/file.py:function (the function a plain identifier)
MODULE_SPEC = re.compile(r"(?P<module>[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*):(?P<function>[A-Za-z_]\w*)")
FILE_SPEC = re.compile(r"(?P<file>.+\.py):(?P<function>[A-Za-z_]\w*)")
USER_PACKAGE = "lr_sweep_user"


class SourceError(InputError):
    """A model or data source the user named cannot be used; `field` is the config field to fix."""


@dataclass(frozen=True)
class CodeRef:
    """Where a user function lives: a file or a module, and the function's name."""

    spec: str
    function: str
    file: Path | None = None
    module: str | None = None


def parse_code_spec(spec: str, field: str) -> CodeRef:
    """The spec's parts, from its text alone (no file is read: validation stays pure)."""
    if (match := FILE_SPEC.fullmatch(spec)) is not None:
        return CodeRef(spec=spec, function=match["function"], file=Path(match["file"]))
    if (match := MODULE_SPEC.fullmatch(spec)) is not None:
        return CodeRef(spec=spec, function=match["function"], module=match["module"])
    raise SourceError(field, f"{spec!r} is not a code reference: use package.module:function or "
                             "path/to/file.py:function")


def is_code_spec(spec: str) -> bool:
    return FILE_SPEC.fullmatch(spec) is not None or MODULE_SPEC.fullmatch(spec) is not None


def _package_root(path: Path) -> Path | None:
    """The outermost folder above `path` that still holds an __init__.py; None outside a package."""
    top, folder = None, path.parent
    while (folder / "__init__.py").exists() and folder.parent != folder:
        top, folder = folder, folder.parent
    return top


def _files_digest(path: Path) -> str:
    """SHA-256 over the relative names and SHA-256s of `path` and of its package's .py files."""
    root = _package_root(path)
    files = [path] if root is None else sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    base = path.parent if root is None else root.parent
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(base)).encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def _module_origin(ref: CodeRef, field: str) -> Path:
    """The file of the module's top-level package (or of the module itself), found without
    running any of it."""
    top = ref.module.split(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError) as error:
        raise SourceError(field, f"cannot find module {top!r} for {ref.spec!r}: {error}") from None
    if found is None or found.origin in (None, "built-in", "frozen"):
        raise SourceError(field, f"cannot import {ref.module!r} for {ref.spec!r}: no module named {top!r} "
                                 "(is its package installed, or on PYTHONPATH?)")
    return Path(found.origin)


def _source_file(ref: CodeRef, field: str) -> Path:
    if ref.file is None:
        return _module_origin(ref, field)
    if not ref.file.is_file():
        raise SourceError(field, f"{ref.spec!r}: file {str(ref.file)!r} does not exist")
    return ref.file.resolve()


def code_digest(ref: CodeRef, field: str) -> str:
    """The digest of the code a spec names, computed from its files without importing them."""
    return _files_digest(_source_file(ref, field))


def _load_file(path: Path, field: str, spec: str):
    name = f"{USER_PACKAGE}.{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SourceError(field, f"{spec!r}: cannot load {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as error:
        del sys.modules[name]
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise SourceError(field, f"{spec!r}: importing {str(path)!r} failed: {type(error).__name__}: {error}") from None
    return module


def load_callable(ref: CodeRef, field: str) -> Callable:
    """Import the code a spec names and return its function. Every failure is a SourceError
    naming `field`: the user's code, not ours, is what to fix."""
    source = _source_file(ref, field)
    if ref.file is not None:
        module = _load_file(source, field, ref.spec)
    else:
        try:
            module = importlib.import_module(ref.module)
        except Exception as error:
            raise SourceError(field, f"{ref.spec!r}: importing {ref.module!r} failed: "
                                     f"{type(error).__name__}: {error}") from None
    function = getattr(module, ref.function, None)
    if function is None:
        raise SourceError(field, f"{ref.spec!r}: {ref.module or ref.file} has no {ref.function!r}")
    if not callable(function):
        raise SourceError(field, f"{ref.spec!r}: {ref.function!r} is a {type(function).__name__}, not a function")
    return function
