"""`make gpu-bundle`: one tarball that runs the GPU check on a node with no internet.

GPU nodes are often air-gapped and come with Python, torch and torchvision and nothing else. The
bundle (`tar.xz`, under 60 MiB) holds what such a node lacks:

    lr-sweep-gpu/project/   the project's git-tracked files (run from source: PYTHONPATH)
    lr-sweep-gpu/site/      every runtime dependency of pyproject.toml except torch, torchvision
                            and what they pull in (nvidia-*, triton, numpy, ...), installed for the
                            node's Python by `pip install --target --no-deps --only-binary=:all:`
                            from a list pinned to the versions of THIS environment, so the node runs
                            what the tests here ran; then stripped of what no import reads
    lr-sweep-gpu/data/      Fashion-MNIST's four IDX files, decompressed (xz packs them smaller
                            than their .gz), where the data source looks first
    lr-sweep-gpu/bundle.json  the pinned list, the Python it is for, the commit, what was stripped

    make gpu-bundle PYTHON_VERSION=3.12 GPU_BUNDLE=dist/gpu-bundle.tar.xz
    benchmarks/gpu_check.sh --bundle dist/gpu-bundle.tar.xz      # on the node

pip needs the package index (or a PIP_FIND_LINKS folder holding the wheels) on the machine that
builds the bundle, not on the node.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

from deploy.pins import NOT_INSTALLED, unsatisfied

ROOT = Path(__file__).resolve().parent.parent
TOP = "lr-sweep-gpu"
MAX_BUNDLE_MIB = 60
# xz at its strongest (4-5 minutes on one core): the bundle travels to the node under a size limit.
XZ_PRESET = 9 | lzma.PRESET_EXTREME
# At the strongest preset, a dictionary near the unpacked tree's size (about 210 MiB) instead of
# 64 MiB, so a match far back (a library that two packages vendor) is still found: 0.3 MiB smaller.
# Unpacking needs as much memory; packing about 2 GB.
LARGE_DICTIONARY = 192 * 2**20
# What the node brings: these, and everything they require.
NODE_PROVIDES = ("torch", "torchvision")
# CUDA's wheels are torch's own business on the node, whatever their names.
NODE_PREFIXES = ("nvidia-", "cuda-", "triton")
DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASET_RAW = "data/FashionMNIST/raw"
# pip matches a platform tag exactly: every manylinux glibc level a wheel may carry, up to the
# node's (glibc 2.39 on Ubuntu 24.04), and the legacy aliases.
PLATFORMS = ([f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])
# Stripped from the installed tree: no import reads them. Folders by name, files by suffix.
STRIP_DIRS = {"__pycache__", "tests", "test"}
STRIP_SUFFIXES = (".pyi", ".pyc", ".pyx", ".pxd", ".c", ".cpp", ".h")
# Paths no process of the check reads (its CPU run from the bundle, tests/test_gpu_bundle.py,
# proves it for the code paths it takes): Prefect's UI, whose server gpu_check.sh starts with
# PREFECT_UI_ENABLED=false (17 MB); W&B's parquet reader, for reading history back through its API
# (10 MB); matplotlib's PDF/PS fonts, sample data and DejaVu Serif fonts (the charts use the
# default sans-serif and mathtext's DejaVu Sans, STIX and Computer Modern, kept); console scripts
# written for this machine's interpreter.
MATPLOTLIB_UNREAD = ("sample_data", "fonts/afm", "fonts/pdfcorefonts",
                     *(f"fonts/ttf/DejaVuSerif{style}.ttf" for style in ("", "-Bold", "-BoldItalic", "-Italic", "Display")))
STRIP_PATHS = ("prefect/server/ui", "prefect/server/ui-v2", "wandb/bin/librust_parquet_ffi.so", "bin",
               *(f"matplotlib/mpl-data/{name}" for name in MATPLOTLIB_UNREAD))
# Distributions no process of the check imports: Prefect's notification blocks' (8 MB).
OMIT = {"apprise"}
# Shared objects keep their dynamic symbols; their debug sections go (about 57 MB of 180). The
# libraries auditwheel grafted (*.libs) and Go's wandb-core are left as built.
STRIP_COMMAND = ("strip", "--strip-unneeded")
ELF_MAGIC = b"\x7fELF"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(python_version: str) -> dict[str, str]:
    """The marker environment of the node: Linux x86-64, CPython `python_version`."""
    environment = default_environment()
    # This interpreter's own patch level when it is the node's Python (redis, for one, asks for
    # async-timeout below 3.11.3); else the first release of that line.
    same = platform.python_version().rpartition(".")[0] == python_version
    environment.update(python_version=python_version,
                       python_full_version=platform.python_version() if same else f"{python_version}.0",
                       implementation_name="cpython", platform_python_implementation="CPython",
                       sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
    return environment


def requirements(name: str, environment: dict[str, str], extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """What an installed distribution requires on the node, with the extras asked of it (Prefect
    asks for sqlalchemy[asyncio], which brings greenlet)."""
    found = []
    for line in metadata.requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker is None or any(requirement.marker.evaluate(environment | {"extra": extra})
                                             for extra in {"", *extras}):
            found.append(requirement)
    return found


def wanted(requirement: Requirement) -> tuple[str, frozenset[str]]:
    return canonical(requirement.name), frozenset(requirement.extras)


def closure(roots: list[str], environment: dict[str, str], missing_ok: bool = False) -> set[str]:
    """Every distribution `roots` need, themselves included, as installed here (`missing_ok`:
    one not installed here counts, without what it would require)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [wanted(Requirement(root)) for root in roots]
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        try:
            todo += [wanted(requirement) for requirement in requirements(item[0], environment, item[1])]
        except metadata.PackageNotFoundError:
            if missing_ok:
                continue
            raise SystemExit(f"gpu_bundle: {item[0]} is required on Python {environment['python_version']} but not "
                             "installed here, so there is no tested version to pin; install it in this environment first")
    return {name for name, _ in seen}


def project_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    return [Requirement(line).name for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def node_provided(name: str, provided: set[str]) -> bool:
    return name in provided or name.startswith(NODE_PREFIXES)


def pinned_list(python_version: str, node_provides: list[str] = (), roots: list[str] | None = None) -> list[str]:
    """`name==version` for each dependency the node lacks, at the version installed here.
    `node_provides`: distributions the node has besides torch and torchvision (with theirs)."""
    environment = target_environment(python_version)
    provided = closure([*NODE_PROVIDES, *node_provides], environment, missing_ok=True)
    needed = closure(roots if roots is not None else project_dependencies(), environment)
    return sorted(f"{name}=={metadata.version(name)}" for name in needed
                  if not node_provided(name, provided) and name not in OMIT)


def unmet_requirements(roots: list[str] | None = None) -> list[str]:
    """What the project's dependencies require and this environment does not hold, as imports
    would find it (on the node: the bundle's tree over the node's own packages). OMIT's
    distributions are left out on purpose and not reported."""
    environment = default_environment()
    problems, seen = set(), set()
    todo = [wanted(Requirement(root)) for root in (roots if roots is not None else project_dependencies())]
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        for requirement in requirements(item[0], environment, item[1]):
            if canonical(requirement.name) in OMIT:
                continue
            if (found := unsatisfied(requirement)) == NOT_INSTALLED:
                problems.add(f"{item[0]} requires {requirement}: missing")
                continue
            if found is not None:
                problems.add(f"{item[0]} requires {requirement}: {found} found")
            todo.append(wanted(requirement))
    return sorted(problems)


def install(pins: list[str], site: Path, python_version: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        listing.write("\n".join(pins) + "\n")
        listing.flush()
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                   "--target", str(site), "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                   "--implementation", "cp", *(flag for tag in PLATFORMS for flag in ("--platform", tag)),
                   "-r", listing.name]
        subprocess.run(command, check=True)


def tree_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() or f.is_symlink())


def is_elf(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == ELF_MAGIC


def strip_debug(site: Path) -> int:
    """Strips the debug sections of the shared objects (see STRIP_COMMAND); the bytes saved."""
    if not shutil.which(STRIP_COMMAND[0]):
        return 0
    targets = [f for f in site.rglob("*.so*") if f.is_file() and not any(p.endswith(".libs") for p in f.parts)
               and f.parent.name != "bin" and is_elf(f)]
    if not targets:
        return 0
    before = sum(f.stat().st_size for f in targets)
    subprocess.run([*STRIP_COMMAND, *map(str, targets)], check=True)
    return before - sum(f.stat().st_size for f in targets)


def strip(site: Path) -> dict[str, int]:
    """Removes what no import reads; the bytes removed, by rule."""
    removed = {"paths": 0, "dirs": 0, "suffixes": 0, "debug_sections": 0}
    for relative in STRIP_PATHS:
        target = site / relative
        if target.exists():
            removed["paths"] += tree_bytes(target)
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    for directory in sorted(site.rglob("*"), reverse=True):  # deepest first
        if directory.is_dir() and directory.name in STRIP_DIRS and directory.exists():
            removed["dirs"] += tree_bytes(directory)
            shutil.rmtree(directory)
    for file in site.rglob("*"):
        if file.is_file() and file.name.endswith(STRIP_SUFFIXES):
            removed["suffixes"] += file.stat().st_size
            file.unlink()
    removed["debug_sections"] = strip_debug(site)
    return removed


def tracked_files(root: Path = ROOT) -> list[str]:
    """The project as git sees it: tracked files, and new ones .gitignore does not exclude."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (root / name).is_file()]


def git_commit(root: Path = ROOT) -> str | None:
    result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


def ensure_dataset(source: Path = DATASET_DIR) -> Path:
    """Debian's dataset-fashion-mnist, installed with apt when it is missing and we may."""
    if not source.is_dir() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)
    if not source.is_dir():
        raise SystemExit(f"gpu_bundle: no Fashion-MNIST in {source}; install the Debian package dataset-fashion-mnist")
    return source


def add_dataset(staging: Path, source: Path) -> None:
    raw = staging / DATASET_RAW
    raw.mkdir(parents=True)
    for archive in sorted(source.glob("*-ubyte.gz")):
        with gzip.open(archive) as packed, open(raw / archive.stem, "wb") as out:
            shutil.copyfileobj(packed, out)


def archive_order(staging: Path) -> list[Path]:
    """Folders first, then files grouped by kind (shared objects, then by suffix) and by path
    within a kind: like next to like, xz finds more matches (0.25 MiB of the bundle)."""
    paths = sorted(staging.rglob("*"))
    folders = [path for path in paths if path.is_dir()]
    files = [path for path in paths if not path.is_dir()]
    return folders + sorted(files, key=lambda path: (".so" if ".so" in path.suffixes else path.suffix, path))


def xz_filters(preset: int) -> list[dict]:
    dictionary = {"dict_size": LARGE_DICTIONARY} if preset == XZ_PRESET else {}
    return [{"id": lzma.FILTER_LZMA2, "preset": preset, **dictionary}]


def write_tarball(staging: Path, output: Path, preset: int = XZ_PRESET) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with lzma.open(partial, "wb", format=lzma.FORMAT_XZ, filters=xz_filters(preset)) as packed, \
            tarfile.open(fileobj=packed, mode="w") as tar:
        for path in archive_order(staging):
            tar.add(path, arcname=f"{TOP}/{path.relative_to(staging)}", recursive=False)
    partial.replace(output)


def build(output: Path, python_version: str, workdir: Path, node_provides: list[str] = (), dataset: Path | None = None,
          preset: int = XZ_PRESET) -> dict:
    staging = workdir / TOP
    project, site = staging / "project", staging / "site"
    for name in tracked_files():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    pins = pinned_list(python_version, node_provides)
    install(pins, site, python_version)
    installed = tree_bytes(site)
    removed = strip(site)
    add_dataset(staging, dataset or ensure_dataset())
    manifest = {"python_version": python_version, "node_provides": sorted(node_provides),
                "built_with": platform.python_version(), "git_commit": git_commit(),
                "pins": pins, "site_bytes_installed": installed, "site_bytes_stripped": removed,
                "site_bytes": tree_bytes(site), "project_bytes": tree_bytes(project),
                "data_bytes": tree_bytes(staging / "data")}
    (staging / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_tarball(staging, output, preset)
    manifest["bundle_bytes"] = output.stat().st_size
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="dist/gpu-bundle.tar.xz", help="The tarball to write. Default: %(default)s.")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="The node's Python, MAJOR.MINOR. Default: this one's, %(default)s.")
    parser.add_argument("--node-provides", nargs="+", default=[], metavar="NAME",
                        help="Distributions the node has besides torch and torchvision, left out with what they "
                        "require (e.g. matplotlib: the H200 image has it); the node's versions then run.")
    parser.add_argument("--xz-preset", type=int, choices=range(10), default=None,
                        help="xz's preset, 0-9 (default: 9, extreme); lower is faster and larger.")
    parser.add_argument("--pins", action="store_true", help="Print the pinned list for that Python and stop.")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.exit(2, f"gpu_bundle: --python-version must be MAJOR.MINOR such as 3.12, not {args.python_version!r}\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pins:
        print("\n".join(pinned_list(args.python_version, args.node_provides)))
        return 0
    with tempfile.TemporaryDirectory(prefix="lr-sweep-bundle-") as workdir:
        preset = XZ_PRESET if args.xz_preset is None else args.xz_preset
        manifest = build(Path(args.output), args.python_version, Path(workdir), args.node_provides, preset=preset)
    mib = manifest["bundle_bytes"] / 2**20
    print(f"{args.output}: {mib:.1f} MiB for Python {args.python_version} ({len(manifest['pins'])} packages; "
          f"site {manifest['site_bytes'] / 2**20:.0f} MiB unpacked after stripping "
          f"{sum(manifest['site_bytes_stripped'].values()) / 2**20:.0f} MiB; data {manifest['data_bytes'] / 2**20:.0f} MiB)")
    if mib >= MAX_BUNDLE_MIB:
        # Written all the same: a node without a transfer limit can use it.
        print(f"gpu_bundle: over the {MAX_BUNDLE_MIB} MiB target; --node-provides (NODE_PROVIDES=) leaves out what the "
              "node already has", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
