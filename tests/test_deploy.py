"""The deployment files, checked without a Docker engine or a server.

prefect.yaml's GPU jobs are rendered the way a Docker worker renders them (pool template +
deployment job variables, prefect-docker's own code) down to the HostConfig docker-py would send
to the engine; the pool-template trap is shown on the template Prefect falls back to; the
Dockerfile is held to pyproject.toml's pins.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
import tomllib
import yaml
from docker.models.containers import _create_container_args
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.templating import apply_values
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

from deploy.pins import pin_mismatches, pinned_requirements
from deploy.pools import TemplateError, check_template, docker_pool_template
from deploy.prebuilt import BUILT_IMAGE_PLACEHOLDER, prebuilt_project
from deploy.prebuilt import main as prebuilt_main
from flows.config import SweepConfig
from tests.conftest import REPO_ROOT

IMAGE = "registry.example.com/ml/lr-sweep:2026-01-01"
# The Docker API version docker-py would negotiate with a current engine (device requests need 1.40+).
DOCKER_API_VERSION = "1.44"
GPU_DEPLOYMENTS = [("lr_sweep", "lr-sweep"), ("lr_sweep_trial", "trial-gpu"), ("lr_sweep_export", "export-docker")]
LOCAL_DEPLOYMENTS = [("lr_sweep", "local"), ("lr_sweep_trial", "trial-local")]
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def project() -> dict:
    return yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())


def deployment(flow_function: str, name: str, source: dict | None = None) -> dict:
    matches = [d for d in (source or project())["deployments"]
               if d["name"] == name and d["entrypoint"].endswith(f":{flow_function}")]
    assert len(matches) == 1, f"{flow_function}/{name}: {len(matches)} deployments"
    return matches[0]


def render_container(job_variables: dict, template: dict) -> dict:
    """What a Docker worker would create for a flow run of this deployment: the arguments of
    docker-py's `containers.create`, turned into the engine's create-container body."""
    values = apply_values(job_variables, {"build-image": {"image": IMAGE}})  # `prefect deploy` does this
    # A GPU node reaches the server by name; a local URL would make the worker ask the engine.
    with temporary_settings({PREFECT_API_URL: "http://prefect.internal:4200/api"}):
        configuration = run_coro_as_sync(
            DockerWorkerJobConfiguration.from_template_and_values(template, values))
        configuration.prepare_for_flow_run(flow_run=FlowRun(name="render-test", flow_id=uuid4()),
                                           worker_name="gpu-node-1")
        settings = DockerWorker(work_pool_name="lr-sweep-gpu")._build_container_settings(None, configuration)
    return _create_container_args({**settings, "version": DOCKER_API_VERSION})


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE, re.M).group(1)


# --- the GPU deployments -----------------------------------------------------------------------

@pytest.mark.parametrize("flow_function,name", GPU_DEPLOYMENTS)
def test_gpu_job_keeps_device_request_shm_and_volumes_through_the_docker_worker(flow_function, name):
    spec = deployment(flow_function, name)
    assert spec["work_pool"]["name"] == "lr-sweep-gpu"
    created = render_container(spec["work_pool"]["job_variables"], docker_pool_template())
    host = created["host_config"]
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["ShmSize"] == 8 * 1024**3
    assert host["Binds"] == ["lr-sweep-data:/opt/lr-sweep/data", "lr-sweep-registry:/opt/lr-sweep/registry",
                             "lr-sweep-runs:/opt/lr-sweep/runs"]
    assert created["image"] == IMAGE
    assert created["command"] == "prefect flow-run execute"  # the process worker's path, in a container
    assert created["environment"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/opt/lr-sweep/runs/")
    assert created["environment"]["PREFECT__WORKER_NAME"] == "gpu-node-1"  # keys the device limits


def test_a_pool_without_prefect_docker_would_drop_the_gpu_request():
    """The trap: without prefect-docker, `prefect work-pool create --type docker` uses the
    collection registry's template (the server's bundled copy offline). Rendered through it, the
    same deployment starts a container without GPUs and with the default /dev/shm."""
    import prefect.server.api.collections as collections

    bundled = Path(collections.__file__).parent / "collections_data/views/aggregate-worker-metadata.json"
    fallback = json.loads(bundled.read_text())["prefect-docker"]["docker"]["default_base_job_configuration"]
    job_variables = deployment("lr_sweep", "lr-sweep")["work_pool"]["job_variables"]
    host = render_container(job_variables, fallback)["host_config"]
    assert "DeviceRequests" not in host and "ShmSize" not in host
    with pytest.raises(TemplateError, match="container_create_kwargs"):
        check_template(fallback)
    check_template(docker_pool_template())  # what `make pools` writes passes


def test_container_paths_are_the_image_workdir_and_the_config_defaults():
    workdir = dockerfile_workdir()
    defaults = {SweepConfig.model_fields[f].default for f in ("data_dir", "registry_dir", "output_dir")}
    for flow_function, name in GPU_DEPLOYMENTS:
        spec = deployment(flow_function, name)
        assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
        targets = {Path(v.split(":")[1]) for v in spec["work_pool"]["job_variables"]["volumes"]}
        assert targets == {Path(workdir) / d for d in defaults}  # the relative defaults, resolved
        steps = [next(iter(step)) for step in spec["build"] + spec["push"]]
        assert steps == ["prefect_docker.deployments.steps.build_docker_image",
                         "prefect_docker.deployments.steps.push_docker_image"]
        assert spec["build"][0]["prefect_docker.deployments.steps.build_docker_image"]["dockerfile"] == "Dockerfile"
    for directory in defaults:  # the image creates them for the non-root user the volumes inherit
        assert re.search(rf"mkdir -p [^\n]*\b{directory}\b", DOCKERFILE)


# --- every deployment ----------------------------------------------------------------------------

def test_local_deployments_run_the_same_flows_on_the_process_pool():
    for flow_function, name in LOCAL_DEPLOYMENTS:
        spec = deployment(flow_function, name)
        assert spec["work_pool"]["name"] == "lr-sweep-process"
        assert "build" not in spec and "push" not in spec and "job_variables" not in spec["work_pool"]
        gpu = deployment(flow_function, "lr-sweep" if flow_function == "lr_sweep" else "trial-gpu")
        assert spec["entrypoint"] == gpu["entrypoint"]
        assert spec["work_pool"].get("work_queue_name") == gpu["work_pool"].get("work_queue_name", "default")


def test_deployments_restate_no_defaults_and_load_their_flows():
    names = {}
    for spec in project()["deployments"]:
        assert spec["parameters"] == {}, f"{spec['name']}: defaults belong to SweepConfig"
        flow = load_flow_from_entrypoint(spec["entrypoint"])  # module paths: one copy of each module
        names.setdefault(flow.name, set()).add(spec["name"])
        if flow.name == "lr-sweep-export":  # plain parameters, filled in from the promotion event
            continue
        config = flow.parameters.properties["config"]  # the sweep: SweepConfig, or None for its defaults
        assert config.get("$ref", (config.get("anyOf") or [{}])[0].get("$ref", "")).endswith("SweepConfig")
    assert names == {"lr-sweep": {"lr-sweep", "local"}, "lr-sweep-trial": {"trial-gpu", "trial-local"},
                     "lr-sweep-export": {"export-local", "export-docker"}}
    # Distinct names in the UI's deployment list; each sweep finds its pool's trial deployment.
    assert len(set().union(*names.values())) == 6
    pools = {(d["entrypoint"], d["work_pool"]["name"]) for d in project()["deployments"]}
    for pool in ("lr-sweep-gpu", "lr-sweep-process"):
        assert ("flows.trial:lr_sweep_trial", pool) in pools and ("flows.sweep:lr_sweep", pool) in pools


def test_the_sweep_schedule_is_defined_but_inactive():
    for name in ("lr-sweep", "local"):
        schedules = deployment("lr_sweep", name)["schedules"]
        assert schedules and all(schedule["active"] is False for schedule in schedules)
        for schedule in schedules:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # valid as written


def test_prebuilt_variant_is_prefect_yaml_without_build_and_push():
    original = project()
    prebuilt = prebuilt_project(original, IMAGE)
    for flow_function, name in GPU_DEPLOYMENTS:
        before, after = deployment(flow_function, name, original), deployment(flow_function, name, prebuilt)
        assert "build" not in after and "push" not in after
        assert after["work_pool"]["job_variables"]["image"] == IMAGE
        assert before["work_pool"]["job_variables"]["image"] == BUILT_IMAGE_PLACEHOLDER
        rest = lambda d: {k: v for k, v in d.items() if k not in ("build", "push", "work_pool")}  # noqa: E731
        assert rest(after) == rest(before)
        assert ({k: v for k, v in after["work_pool"]["job_variables"].items() if k != "image"}
                == {k: v for k, v in before["work_pool"]["job_variables"].items() if k != "image"})
    for flow_function, name in LOCAL_DEPLOYMENTS:
        assert deployment(flow_function, name, prebuilt) == deployment(flow_function, name, original)
    with pytest.raises(ValueError, match="image reference"):
        prebuilt_project(original, "")


def test_cpu_host_job_variables_drop_the_gpu_request_and_use_the_host_network(tmp_path, capsys):
    """deploy/cpu-host.json (make deploy-prebuilt JOB_VARIABLES=...): one machine, no GPU."""
    cpu_host = json.loads((REPO_ROOT / "deploy/cpu-host.json").read_text())
    prebuilt = prebuilt_project(project(), IMAGE, cpu_host)
    for flow_function, name in GPU_DEPLOYMENTS:
        job_variables = deployment(flow_function, name, prebuilt)["work_pool"]["job_variables"]
        assert job_variables["image"] == IMAGE
        created = render_container(job_variables, docker_pool_template())
        host = created["host_config"]
        assert "DeviceRequests" not in host and host["NetworkMode"] == "host"
        assert host["ShmSize"] == 8 * 1024**3
        assert host["Binds"] == ["lr-sweep-data:/opt/lr-sweep/data", "lr-sweep-registry:/opt/lr-sweep/registry",
                                 "lr-sweep-runs:/opt/lr-sweep/runs"]
        assert created["environment"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/opt/lr-sweep/runs/")
    for flow_function, name in LOCAL_DEPLOYMENTS:
        assert deployment(flow_function, name, prebuilt) == deployment(flow_function, name)
    with pytest.raises(ValueError, match="image argument"):
        prebuilt_project(project(), IMAGE, {"image": "other:tag"})
    # The command line of `make deploy-prebuilt JOB_VARIABLES=FILE`.
    assert prebuilt_main([str(REPO_ROOT / "prefect.yaml"), IMAGE, "--job-variables",
                          str(REPO_ROOT / "deploy/cpu-host.json")]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == prebuilt
    (tmp_path / "list.json").write_text("[]")
    assert prebuilt_main([str(REPO_ROOT / "prefect.yaml"), IMAGE, "--job-variables", str(tmp_path / "list.json")]) == 1
    assert "a JSON object is needed" in capsys.readouterr().err


# --- the Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_installs_exactly_the_pins_of_pyproject():
    pyproject = REPO_ROOT / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    # The command the Dockerfile runs, run here: its output is what pip installs in the image.
    printed = subprocess.run([sys.executable, str(REPO_ROOT / "deploy/pins.py"), "requirements", str(pyproject)],
                             capture_output=True, text=True, check=True).stdout.split()
    assert printed == declared == pinned_requirements(pyproject)
    installs = re.findall(r"pip install ([^\n&\\]+)", DOCKERFILE)
    assert [i.strip() for i in installs] == ["-r /tmp/requirements.txt", "--no-deps ."]
    assert "pins.py requirements pyproject.toml > /tmp/requirements.txt" in DOCKERFILE
    assert "pins.py check pyproject.toml" in DOCKERFILE
    # The base image ships torch: its tag must be the pinned version, or pip would install a
    # second torch (and `check` would fail the build if it did not).
    torch_pin = next(r.split("==")[1] for r in declared if r.startswith("torch=="))
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{torch_pin}-cuda") and base.endswith("-runtime")


def test_pin_check_passes_here_and_catches_a_drift(tmp_path):
    assert pin_mismatches(pinned_requirements(REPO_ROOT / "pyproject.toml")) == []  # this venv = the pins
    drifted = tmp_path / "pyproject.toml"
    drifted.write_text((REPO_ROOT / "pyproject.toml").read_text().replace('"torch==2.14.1"', '"torch==2.13.0"'))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "deploy/pins.py"), "check", str(drifted)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "torch: 2.14.1 installed, pyproject.toml wants torch==2.13.0" in result.stderr


def test_dockerfile_layers_user_and_secrets():
    lines = [line for line in DOCKERFILE.splitlines() if line and not line.startswith("#")]
    position = lambda pattern: next(i for i, line in enumerate(lines) if re.search(pattern, line))  # noqa: E731
    assert position(r"pip install -r") < position(r"^COPY flows") < position(r"^USER ")
    assert position(r"^COPY pyproject.toml") < position(r"pip install -r")
    user = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert user and user[-1] not in ("root", "0")
    for line in lines:
        if re.match(r"^(ENV|ARG)\b", line):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", line, re.I), line


def test_dockerfile_builds_with_the_classic_builder_and_takes_a_proxy_ca():
    """prefect-docker's build step (docker-py) and an offline engine use the classic builder: no
    BuildKit-only instruction. Every pip step trusts EXTRA_CA_CERTS through deploy/pip-ca.sh, a
    build argument, never an ENV (which would stay in the image)."""
    lines = [line for line in DOCKERFILE.splitlines() if line and not line.startswith("#")]
    assert not any(re.search(r"--mount|--secret|<<", line) for line in lines)
    assert "ARG EXTRA_CA_CERTS=" in lines
    assert not any(line.startswith("ENV") and "CA_CERT" in line for line in lines)
    pip_steps = [line for line in lines if "pip install" in line]
    assert len(pip_steps) == 2
    assert all("/usr/local/share/lr-sweep/pip-ca.sh python3 -m pip install" in line for line in pip_steps)
    assert "COPY deploy/pins.py deploy/pip-ca.sh /usr/local/share/lr-sweep/" in lines


def test_pip_ca_wrapper_adds_the_certificates_for_the_command_only(tmp_path):
    certificate = "-----BEGIN CERTIFICATE-----\nMIIBproxyca\n-----END CERTIFICATE-----"
    show = [sys.executable, "-c", "import os; p = os.environ['PIP_CERT']; print(p); print(open(p).read())"]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "EXTRA_CA_CERTS": certificate}
    result = subprocess.run([str(REPO_ROOT / "deploy/pip-ca.sh"), *show], env=env, capture_output=True, text=True,
                            check=True)
    bundle, contents = result.stdout.split("\n", 1)
    assert contents.rstrip().endswith(certificate)  # after pip's own bundle
    assert contents.count("BEGIN CERTIFICATE") > 50
    assert not Path(bundle).exists()  # gone with the command
    plain = subprocess.run([str(REPO_ROOT / "deploy/pip-ca.sh"), sys.executable, "-c",
                            "import os; print(os.environ.get('PIP_CERT'))"],
                           env={**env, "EXTRA_CA_CERTS": ""}, capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "None"


def test_the_cpu_base_recipe_holds_the_pins_and_names_its_image_by_its_hash():
    pins = dict(r.split("==") for r in pinned_requirements(REPO_ROOT / "pyproject.toml") if r.startswith("torch"))
    constraints = dict(line.split("==") for line in (REPO_ROOT / "docker/base-constraints.txt").read_text().split())
    assert {name: constraints[name] for name in pins} == pins  # base and Dockerfile agree
    printed = subprocess.run([str(REPO_ROOT / "docker/base-image.sh"), "--print-image"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert re.fullmatch(r"lr-sweep-base:[0-9a-f]{16}", printed)


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", "registry", "data", ".git", ".prefect", "wandb"} <= ignored
    assert not ignored & {"flows", "tasks", "models", "deploy", "pyproject.toml", "README.md"}


def test_serve_takes_the_nightly_schedule_of_prefect_yaml():
    from flows.cli import nightly_cron

    assert [schedule["cron"] for schedule in deployment("lr_sweep", "local")["schedules"]] == [nightly_cron()]
