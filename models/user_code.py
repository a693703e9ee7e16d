"""User code named by a spec: `package.module:function` or `path/to/file.py:function`.

A model factory or a dataset function of the user's is found here, and nowhere else. Two rules:

- A file is loaded with importlib under a module name of its own (`lr_sweep_user.<stem>_<hash>`;
  in a package, as a module of that package under a name of its own, so relative imports work),
  and its folder is not put on `sys.path`: a user's `models/` or `tasks/` folder next to the file
  never shadows ours, and ours never shadows theirs.
- Code is imported only when the running command's own configuration names it.

A model's code digest (`load`) is of the code as imported: the file's bytes as they ran, every
module that importing it pulled in from outside the standard library, site-packages and
lr-sweep (loaded from their bytes too, without a bytecode cache), and every file of the package
it sits in (the folders above it that hold an `__init__.py`), data files included. A dataset
function's digest (`code_digest`) is still taken from the files, before any of them runs: it is
part of the data's fingerprint, checked before the data is read.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import site
import sys
import sysconfig
import threading
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
    if found is None:
        raise SourceError(field, f"cannot import {ref.module!r} for {ref.spec!r}: no module named {top!r} "
                                 "(is its package installed, or on PYTHONPATH?)")
    if found.origin is None and found.submodule_search_locations:
        folders = ", ".join(map(str, found.submodule_search_locations))
        raise SourceError(field, f"{ref.spec!r}: {top!r} is a namespace package (a folder without __init__.py: "
                                 f"{folders}); lr-sweep counts a package's files in the model's code digest, so "
                                 "make it a regular package: add an __init__.py")
    if found.origin in (None, "built-in", "frozen") or _in_standard_library(found.origin):
        raise SourceError(field, f"{ref.spec!r} names Python's standard library: it is not a model constructor "
                                 "in a user module (give package.module:function or path/to/file.py:function "
                                 "of your own code, returning a torch.nn.Module)")
    return Path(found.origin)


def _in_standard_library(origin: str) -> bool:
    """In the standard library's folders and not in site-packages: in a virtual environment
    `platstdlib` is the venv's own lib/pythonX.Y, which holds its site-packages too."""
    path = Path(origin).resolve()
    return (any(path.is_relative_to(folder) for folder in _python_folders("stdlib", "platstdlib"))
            and not any(path.is_relative_to(folder) for folder in _site_packages()))


def _python_folders(*names: str) -> tuple[Path, ...]:
    return tuple(Path(sysconfig.get_path(name)).resolve() for name in names)


@functools.cache
def _site_packages() -> tuple[Path, ...]:
    paths = set(site.getsitepackages()) | {site.getusersitepackages()}
    return _python_folders("purelib", "platlib") + tuple(Path(p).resolve() for p in paths if p)


def _source_file(ref: CodeRef, field: str) -> Path:
    if ref.file is None:
        return _module_origin(ref, field)
    if not ref.file.is_file():
        raise SourceError(field, f"{ref.spec!r}: file {str(ref.file)!r} does not exist")
    return ref.file.resolve()


def code_digest(ref: CodeRef, field: str) -> str:
    """The digest of the code a spec names, computed from its files without importing them."""
    return _files_digest(_source_file(ref, field))


@functools.cache
def _outside_user_code() -> tuple[Path, ...]:
    """Folders whose modules are not the user's: the standard library, site-packages, ours."""
    ours = Path(__file__).resolve().parent.parent
    return (_python_folders("stdlib", "platstdlib") + _site_packages()
            + tuple(ours / name for name in ("models", "tasks", "flows")))


def _is_user_file(origin: str | None) -> bool:
    if not origin or not origin.endswith(".py"):
        return False
    path = Path(origin).resolve()
    return not any(path.is_relative_to(folder) for folder in _outside_user_code())


class _SourceBytesLoader(importlib.abc.Loader):
    """Runs a user module from the bytes it reads once, and records their SHA-256: the digest is
    of the exact code that runs. No bytecode cache is read or written, so a stale `.pyc` (a
    same-size edit within its timestamp's second) can never run in place of the source."""

    def __init__(self, path: Path, imported: dict[Path, str]):
        self.path, self.imported = path, imported

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        source = self.path.read_bytes()
        self.imported[self.path] = hashlib.sha256(source).hexdigest()
        exec(compile(source, str(self.path), "exec", dont_inherit=True), module.__dict__)


class _Recorder(importlib.abc.MetaPathFinder):
    """Active while user code is imported: every module it pulls in from outside the standard
    library, site-packages and lr-sweep (a helper beside the model file, the user's package) is
    loaded from its bytes by _SourceBytesLoader and recorded."""

    def __init__(self):
        self.imported: dict[Path, str] = {}
        self.names: list[str] = []

    def find_spec(self, name, path, target=None):
        found = importlib.machinery.PathFinder.find_spec(name, path)
        if found is None or not _is_user_file(found.origin):
            return None  # the import system's own finders take it
        self.names.append(name)
        return importlib.util.spec_from_file_location(
            name, found.origin, loader=_SourceBytesLoader(Path(found.origin), self.imported),
            submodule_search_locations=found.submodule_search_locations)


@dataclass(frozen=True)
class Loaded:
    """User code as this process imported it: the module, the files that count, their digest."""

    module: object
    main: str  # the module's name (a file's: a name of its own, lr_sweep_user.*)
    names: tuple[str, ...]  # the modules the import put in sys.modules (removed on a reload)
    files: dict[str, str]  # the name a file is recorded under -> SHA-256 of its bytes
    paths: dict[str, Path]
    digest: str


_loaded: dict[str, Loaded] = {}
_load_lock = threading.RLock()  # sys.meta_path and sys.modules are the process's


def _counted_files(source: Path, imported: dict[Path, str]) -> tuple[dict[str, str], dict[str, Path]]:
    """The imported files (hashed from the bytes that ran) and every file of the source's package,
    .py or data (a JSON of layer sizes), but no bytecode; each under its name relative to the
    package's folder (or the file's), so the same code elsewhere has the same digest."""
    root = _package_root(source)
    base = source.parent if root is None else root.parent
    on_disk = [source] if root is None else sorted(
        p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    files, paths = {}, {}
    for path in [*on_disk, *imported]:
        name = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)
        paths[name] = path
        files[name] = imported.get(path) or hashlib.sha256(path.read_bytes()).hexdigest()
    return files, paths


def _digest_of(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode() + b"\n")
    return digest.hexdigest()


def _unchanged(loaded: Loaded, source: Path, imported_paths) -> bool:
    try:
        current, _ = _counted_files(source, {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in imported_paths})
    except OSError:
        return False
    return current == loaded.files


def _module_name(path: Path) -> str:
    return f"{USER_PACKAGE}.{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def _import(ref: CodeRef, source: Path, field: str) -> Loaded:
    """Import the code a spec names with the recorder active; every failure a SourceError."""
    recorder = _Recorder()
    kind = "model" if field == "model" else field
    for earlier in _loaded.values():  # a helper another user import loaded is imported (and recorded) anew
        for name in earlier.names:
            if name != earlier.main:
                sys.modules.pop(name, None)
    sys.meta_path.insert(0, recorder)
    try:
        if ref.file is not None:
            module = _exec_file(source, recorder)
        else:
            module = importlib.import_module(ref.module)
    except BaseException as error:
        for name in recorder.names:
            sys.modules.pop(name, None)
        if isinstance(error, KeyboardInterrupt):
            raise
        if isinstance(error, SystemExit):
            raise SourceError(field, f"{ref.spec!r}: the {kind} file exited while being imported (SystemExit("
                                     f"{error.code!r}): a sys.exit or an argument parser at import time; "
                                     "run it only under `if __name__ == '__main__':`)") from None
        raise SourceError(field, f"{ref.spec!r}: importing {ref.module or str(source)!r} failed: "
                                 f"{type(error).__name__}: {error}") from None
    finally:
        sys.meta_path.remove(recorder)
    files, paths = _counted_files(source, recorder.imported)
    return Loaded(module, module.__name__, tuple(recorder.names), files, paths, _digest_of(files))


def _exec_file(source: Path, recorder: _Recorder):
    """Run a user file under a name of its own. A file in a package runs as a module of that
    package, itself under a name of its own (`lr_sweep_user.<package>_<hash>.<module>`), so its
    relative imports (`from . import layers`) find the package's modules, recorded as they load."""
    if USER_PACKAGE not in sys.modules:  # the parent of every user module: a package of nothing
        sys.modules[USER_PACKAGE] = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec(USER_PACKAGE, None, is_package=True))
    root = _package_root(source)
    chain = [] if root is None else [root, *(root / Path(*parts) for parts in
                                             _prefixes(source.parent.relative_to(root).parts))]
    name = _module_name(source if root is None else root)
    for index, folder in enumerate(chain):  # the package, then each subpackage down to the file's
        package = name if index == 0 else f"{name}.{'.'.join(folder.relative_to(root).parts)}"
        _exec_as(package, folder / "__init__.py", recorder, folder)
    if root is None:
        return _exec_as(name, source, recorder)
    parts = source.relative_to(root).with_suffix("").parts
    module = ".".join([name, *(parts[:-1] if source.name == "__init__.py" else parts)])
    # a package's __init__ that imports the file (`from .net import build`) has run it already
    return sys.modules[module] if module in sys.modules else _exec_as(module, source, recorder)


def _prefixes(parts: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [parts[:end] for end in range(1, len(parts) + 1)]


def _exec_as(name: str, path: Path, recorder: _Recorder, package: Path | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, loader=_SourceBytesLoader(path, recorder.imported),
        submodule_search_locations=None if package is None else [str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    recorder.names.append(name)
    spec.loader.exec_module(module)
    return module


def load(ref: CodeRef, field: str, fresh: bool = False) -> Loaded:
    """The code a spec names, imported once per process: a sweep trains, records and evaluates
    with the code it imported first, whatever is saved meanwhile. `fresh` (a sweep's start)
    imports it again if any file that counts changed since."""
    source = _source_file(ref, field)
    key = str(source) if ref.file is not None else ref.module
    with _load_lock:
        loaded = _loaded.get(key)
        if loaded is not None and (not fresh or _unchanged(loaded, source, loaded.paths.values())):
            return loaded
        if loaded is not None:
            for name in loaded.names + ((ref.module,) if ref.module else ()):
                sys.modules.pop(name, None)
        _loaded[key] = _import(ref, source, field)
        return _loaded[key]


def load_callable(ref: CodeRef, field: str, fresh: bool = False) -> Callable:
    """Import the code a spec names and return its function. Every failure is a SourceError
    naming `field`: the user's code, not ours, is what to fix."""
    module = load(ref, field, fresh).module
    function = getattr(module, ref.function, None)
    if function is None:
        raise SourceError(field, f"{ref.spec!r}: {ref.module or ref.file} has no {ref.function!r}")
    if not callable(function):
        raise SourceError(field, f"{ref.spec!r}: {ref.function!r} is a {type(function).__name__}, not a function")
    return function
