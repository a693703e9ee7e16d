"""The GPU work pool's base job template, taken from prefect-docker's Docker worker.

    python -m deploy.pools docker-template FILE   # write it, refusing one that would drop GPUs

Why a file and a check: `prefect work-pool create NAME --type docker` without prefect-docker
installed does not fail. It takes the Docker template from Prefect's collection registry (the
server's bundled copy when offline), and in Prefect 3.9.1 that template's `job_configuration` has
no `container_create_kwargs`: every deployment on the pool then renders without it, the
containers start with no GPU and the default 64 MB /dev/shm, and nothing says so. `make pools`
therefore creates the pool from this file (`--base-job-template`), written by the installed
prefect-docker and checked here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The job settings the GPU deployments rely on; each must be a variable of the template and be
# passed through to the container by its job configuration.
REQUIRED_JOB_FIELDS = ("image", "volumes", "env", "container_create_kwargs")


class TemplateError(RuntimeError):
    """The Docker pool template would silently drop settings the GPU deployments need."""


def docker_pool_template() -> dict:
    """prefect-docker's default base job template for `--type docker` pools, checked."""
    try:
        from prefect_docker.worker import DockerWorker
    except ImportError as error:
        raise TemplateError(
            "prefect-docker is not installed: a Docker pool created without it drops "
            "container_create_kwargs (the GPU request); install it (pip install -e '.[dev]')"
        ) from error
    template = DockerWorker.get_default_base_job_template()
    check_template(template)
    return template


def check_template(template: dict) -> None:
    variables = template.get("variables", {}).get("properties", {})
    job = template.get("job_configuration", {})
    missing = [name for name in REQUIRED_JOB_FIELDS
               if name not in variables or job.get(name) != "{{ " + name + " }}"]
    if missing:
        raise TemplateError(
            f"this Docker pool template does not pass {', '.join(missing)} to the container: "
            "deployments on it would run without their GPU request; use prefect-docker's "
            "template (make pools)")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "docker-template":
        print(__doc__, file=sys.stderr)
        return 2
    try:
        template = docker_pool_template()
    except TemplateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    Path(argv[1]).write_text(json.dumps(template, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
