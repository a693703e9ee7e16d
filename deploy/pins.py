"""The project's pinned dependencies, read from pyproject.toml: the Dockerfile's only source.

    python pins.py requirements pyproject.toml   # one requirement a line, for pip install -r
    python pins.py check pyproject.toml          # exit 1 unless every installed version matches

The image installs what `pip install .` would, on top of a base image that already holds torch
and torchvision; `check` then proves inside the image that what is installed, from the base or
from pip, is what pyproject.toml asks for, and fails the build otherwise. `requirements` needs
only the standard library, so it runs before anything is installed.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib


def pinned_requirements(pyproject: Path) -> list[str]:
    """The `[project] dependencies` of pyproject.toml, as written there."""
    with open(pyproject, "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


NOT_INSTALLED = "not installed"


def unsatisfied(requirement) -> str | None:
    """None when an installed distribution satisfies the `packaging` Requirement; otherwise
    NOT_INSTALLED or the version that is installed. As in pip, a local version label is ignored:
    torch 2.14.1+cu130 satisfies torch==2.14.1."""
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED
    return None if requirement.specifier.contains(installed, prereleases=True) else installed


def pin_mismatches(requirements: list[str]) -> list[str]:
    """One line per requirement that the installed distributions do not satisfy."""
    from packaging.requirements import Requirement  # installed with the dependencies

    problems = []
    for text in requirements:
        requirement = Requirement(text)
        if (found := unsatisfied(requirement)) == NOT_INSTALLED:
            problems.append(f"{requirement.name}: not installed (pyproject.toml wants {text})")
        elif found is not None:
            problems.append(f"{requirement.name}: {found} installed, pyproject.toml wants {text}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("requirements", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    requirements = pinned_requirements(Path(argv[1]))
    if argv[0] == "requirements":
        print("\n".join(requirements))
        return 0
    problems = pin_mismatches(requirements)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
