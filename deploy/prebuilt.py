"""prefect.yaml for an image built elsewhere: the same deployments, without build and push steps.

    python -m deploy.prebuilt prefect.yaml registry.example.com/lr-sweep:TAG > prefect.prebuilt.yaml
    prefect --no-prompt deploy --prefect-file prefect.prebuilt.yaml --name lr-sweep/lr-sweep

`make deploy-prebuilt IMAGE=...` runs both. prefect.yaml stays the one description of the
deployments: this only drops the Docker build/push steps (which need a Docker engine) and points
`job_variables.image` at the given image, so a machine without Docker (a CI runner, a laptop)
can register or update the GPU deployments of an image that CI built and pushed.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

BUILT_IMAGE_PLACEHOLDER = "{{ build-image.image }}"


class PlainDumper(yaml.SafeDumper):
    """Writes shared values out in full, without YAML anchors: easier to read and to diff."""

    def ignore_aliases(self, data) -> bool:
        return True


def prebuilt_project(project: dict, image: str) -> dict:
    """The project with every deployment that builds its image switched to `image`."""
    if not image or any(char.isspace() for char in image):
        raise ValueError(f"image {image!r} is not an image reference like registry/name:tag")
    project = copy.deepcopy(project)
    project.pop("definitions", None)  # already resolved into the deployments by the YAML anchors
    switched = 0
    for deployment in project.get("deployments", []):
        job_variables = deployment.get("work_pool", {}).get("job_variables") or {}
        if job_variables.get("image") == BUILT_IMAGE_PLACEHOLDER:
            deployment.pop("build", None)
            deployment.pop("push", None)
            deployment["work_pool"]["job_variables"] = {**job_variables, "image": image}
            switched += 1
    if not switched:
        raise ValueError(f"no deployment uses {BUILT_IMAGE_PLACEHOLDER!r}: nothing to switch")
    return project


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    project = yaml.safe_load(Path(argv[0]).read_text())
    try:
        prebuilt = prebuilt_project(project, argv[1])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.dump(prebuilt, Dumper=PlainDumper, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
