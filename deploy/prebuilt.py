"""prefect.yaml for an image built elsewhere: the same deployments, without build and push steps.

    python -m deploy.prebuilt prefect.yaml registry.example.com/lr-sweep:TAG > prefect.prebuilt.yaml
    prefect --no-prompt deploy --prefect-file prefect.prebuilt.yaml --name lr-sweep/lr-sweep
    python -m deploy.prebuilt prefect.yaml lr-sweep:local --job-variables deploy/cpu-host.json

`make deploy-prebuilt IMAGE=... [JOB_VARIABLES=FILE]` runs both. prefect.yaml stays the one
description of the deployments: this only drops the Docker build/push steps (which need a Docker
engine) and points `job_variables.image` at the given image, so a machine without Docker (a CI
runner, a laptop) can register or update the GPU deployments of an image that CI built and pushed.

`--job-variables FILE` (a JSON object) replaces those job variables of the Docker deployments, key
by key, as a flow run's job variables would: `deploy/cpu-host.json` runs them on one machine
without a GPU (no device request, the host's network). The trial runs of `dispatch: deployment`
take the job variables of their deployment, not those of the sweep's run, so this is how trials
get them too.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml

BUILT_IMAGE_PLACEHOLDER = "{{ build-image.image }}"


class PlainDumper(yaml.SafeDumper):
    """Writes shared values out in full, without YAML anchors: easier to read and to diff."""

    def ignore_aliases(self, data) -> bool:
        return True


def prebuilt_project(project: dict, image: str, job_variables: dict | None = None) -> dict:
    """The project with every deployment that builds its image switched to `image`, and its job
    variables updated with `job_variables` (top-level keys replace the deployment's)."""
    if not image or any(char.isspace() for char in image):
        raise ValueError(f"image {image!r} is not an image reference like registry/name:tag")
    job_variables = dict(job_variables or {})
    if "image" in job_variables:
        raise ValueError("the job variables give an image: give it as the image argument instead")
    project = copy.deepcopy(project)
    project.pop("definitions", None)  # already resolved into the deployments by the YAML anchors
    switched = 0
    for deployment in project.get("deployments", []):
        current = deployment.get("work_pool", {}).get("job_variables") or {}
        if current.get("image") == BUILT_IMAGE_PLACEHOLDER:
            deployment.pop("build", None)
            deployment.pop("push", None)
            deployment["work_pool"]["job_variables"] = {**current, **job_variables, "image": image}
            switched += 1
    if not switched:
        raise ValueError(f"no deployment uses {BUILT_IMAGE_PLACEHOLDER!r}: nothing to switch")
    return project


def read_job_variables(path: str) -> dict:
    try:
        job_variables = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--job-variables {path}: {error}") from None
    if not isinstance(job_variables, dict):
        raise ValueError(f"--job-variables {path}: a JSON object is needed")
    return job_variables


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[2] == "--job-variables":
        job_variables_file = argv[3]
    elif len(argv) == 2:
        job_variables_file = None
    else:
        print(__doc__, file=sys.stderr)
        return 2
    project = yaml.safe_load(Path(argv[0]).read_text())
    try:
        job_variables = read_job_variables(job_variables_file) if job_variables_file else None
        prebuilt = prebuilt_project(project, argv[1], job_variables)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.dump(prebuilt, Dumper=PlainDumper, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
