"""The Docker worker end to end, on one machine without a GPU (`make test-docker`, docker/ci.sh).

The image is built as README "Docker worker without a GPU" says: docker/build-image.sh, that is the
CPU base of docker/base-image.sh (reused while its recipe hash is unchanged) and the project's
Dockerfile as it is. A Prefect server on PostgreSQL (DOCKER_E2E_DATABASE_URL) listens on
127.0.0.1; `make pools` creates the Docker pool, `make deploy-prebuilt IMAGE=...` the GPU
deployments, `make gpu-worker` starts two Docker workers, `prefect deployment run lr-sweep/lr-sweep`
starts sweeps with a job-variable override for a host without GPUs (deploy/cpu-host.json: no
device request, the host's network) and Debian's Fashion-MNIST mounted read-only. Checked: the
GPU request is still what the deployment asks for without the override; the flow runs as the
image's non-root user and writes to the three named volumes; the alias moves, and a second sweep
reuses the registry volume; `dispatch: deployment` spreads the trials over both workers on one
shared registry volume; an image derived from it by examples/Dockerfile (the example model's
package pip-installed) sweeps `--model resnet_model:small_resnet` on the same workers, its alias
in a collection of its own; fake API keys in the workers' environment reach no image layer, image
file, volume or output. Every process, container, volume and image made here is removed by its
id or unique name at the end.

Needs root (the base image's debootstrap), a Docker engine started with host networking only
(docker/ci.sh: --bridge=none) and PostgreSQL. BUILD_EXTRA_CA, BUILD_PIP_CONF and BUILD_PIP_MOUNTS
reach docker/build-image.sh through the environment (a TLS-inspecting proxy's CA, local wheels).
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

import docker as docker_sdk
from models.local_registry import LocalRegistry
from models.sources import ModelSource
from tests.conftest import REPO_ROOT, SYSTEM_FASHION_MNIST

pytestmark = pytest.mark.docker

BIN = Path(sys.executable).parent
SERVER_START_SECONDS = 240
RUN_SECONDS = 600
SMOKE = {"epochs": 1, "train_limit": 1000, "val_size": 2000, "device": "cpu"}
COLLECTION = "fashion-mnist-cnn"
ALIAS = "production"
USER_ID = 10001  # the Dockerfile's lrsweep user
VOLUME_ROLES = {"data": "/opt/lr-sweep/data", "registry": "/opt/lr-sweep/registry", "runs": "/opt/lr-sweep/runs"}
DATASET_MOUNT = f"{SYSTEM_FASHION_MNIST}:{SYSTEM_FASHION_MNIST}:ro"
EXAMPLES = REPO_ROOT / "examples"  # the example model's package and the Dockerfile deriving an image with it
USER_MODEL = "resnet_model:small_resnet"  # by module: the package is installed in the derived image
USER_COLLECTION = "fashion-mnist-small_resnet"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def docker(*args: str, timeout: float = 600, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@dataclass
class Volume:
    """A snapshot of a named volume, read through a container of the image (any Docker user can)."""

    name: str
    members: list[tarfile.TarInfo]
    path: Path  # the files, extracted here

    def files(self) -> list[tarfile.TarInfo]:
        return [m for m in self.members if m.isfile()]

    def listing(self, depth: int = 3) -> list[str]:
        lines = []
        for member in sorted(self.members, key=lambda m: m.name):
            name = member.name.removeprefix("./")
            if name in ("", ".") or name.count("/") >= depth:
                continue
            kind = "d" if member.isdir() else "l" if member.issym() else "-"
            target = f" -> {member.linkname}" if member.issym() else ""
            lines.append(f"{kind} {member.uid}:{member.gid} {member.size:>10} {name}{target}")
        files = self.files()
        lines.append(f"({len(files)} files, {sum(m.size for m in files):,} bytes; owners "
                     f"{sorted({(m.uid, m.gid) for m in self.members})})")
        return lines


@dataclass
class Stack:
    uid: str
    home: Path
    secrets: dict
    image: str = ""
    api_url: str = ""
    database_url: str = ""
    worker_names: tuple = ()
    first_holder: object = None
    processes: list = field(default_factory=list)
    volumes: list = field(default_factory=list)
    images: list = field(default_factory=list)
    report: list = field(default_factory=list)

    # --- processes ---------------------------------------------------------------------------
    def env(self, name: str, **extra: str) -> dict:
        """A clean environment: nothing of this test process's Prefect, W&B or sweep settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LR_SWEEP_", "PREFECT_", "WANDB_"))}
        env.update({"PREFECT_HOME": str(self.home / name / "prefect-home"), "PREFECT_API_URL": self.api_url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "PREFECT_LOGGING_LEVEL": "INFO"})
        env.update(extra)
        return env

    def start(self, name: str, args: list, env: dict) -> subprocess.Popen:
        """A long-running process in its own session, so that stopping it stops its children."""
        (self.home / name).mkdir(exist_ok=True)
        log = open(self.home / f"{name}.log", "w")
        process = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((name, process))
        return process

    def run(self, args: list, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(args, env=env or self.env("client"), cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        return result

    def make(self, *targets: str, env: dict | None = None) -> str:
        # -o and BIN: the venv running these tests is given; make must not build another.
        return self.run(["make", "-s", "-o", ".venv/.installed", f"BIN={BIN}", *targets], env=env).stdout

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text()

    def say(self, line: str) -> None:
        self.report.append(line)
        print(line, flush=True)

    # --- Docker objects ----------------------------------------------------------------------
    def volume(self, role: str, variant: str = "") -> str:
        name = f"lr-sweep-{role}{variant}-{self.uid}"
        if name not in self.volumes:
            self.volumes.append(name)
        return name

    def job_variables(self, registry_variant: str = "") -> dict:
        """deploy/cpu-host.json with this test's volumes and Debian's Fashion-MNIST (read-only)."""
        job_variables = json.loads((REPO_ROOT / "deploy/cpu-host.json").read_text())
        volumes = [f"{self.volume(role, registry_variant if role == 'registry' else '')}:{target}"
                   for role, target in VOLUME_ROLES.items()]
        assert [v.split(":")[1] for v in job_variables["volumes"]] == list(VOLUME_ROLES.values())
        return job_variables | {"volumes": volumes + [DATASET_MOUNT]}

    def snapshot(self, name: str) -> Volume:
        data = subprocess.run(["docker", "run", "--rm", "--network", "host", "-v", f"{name}:/volume:ro",
                               "--entrypoint", "tar", self.image, "-C", "/volume", "-cf", "-", "."],
                              capture_output=True, timeout=300, check=True).stdout
        path = self.home / "volumes" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            members = archive.getmembers()
            # W&B leaves symbolic links to absolute paths of the container (its debug logs): listed,
            # not extracted.
            archive.extractall(path, members=[m for m in members if not (m.issym() or m.islnk())], filter="data")
        return Volume(name, members, path)

    def cleanup(self) -> None:
        # Last started, first stopped: the workers while the server still answers them.
        for _, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for image in self.images:  # flow-run containers the workers left, by id
            for container in docker("ps", "-aq", "--filter", f"ancestor={image}", check=False).split():
                docker("rm", "-f", container, check=False)
        for name in self.volumes:
            docker("volume", "rm", "-f", name, check=False)
        for image in self.images:
            docker("rmi", "-f", image, check=False)


def wait_until_healthy(stack: Stack, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{stack.log('server')}"
        try:
            with urllib.request.urlopen(f"{stack.api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {SERVER_START_SECONDS} s:\n{stack.log('server')}")


def build(stack: Stack, tag: str, *options: str) -> tuple[float, str]:
    """docker/build-image.sh, with the fake keys in its environment (none may reach the image)."""
    started = time.monotonic()
    result = stack.run([str(REPO_ROOT / "docker/build-image.sh"), tag, *options], timeout=3600,
                       env={**os.environ, **stack.secrets})
    stack.images.append(tag)
    (stack.home / f"build-{tag.replace(':', '_')}.log").write_text(result.stderr)
    return time.monotonic() - started, result.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    database_url = os.environ.get("DOCKER_E2E_DATABASE_URL", "")
    if not database_url.startswith("postgresql+asyncpg://"):
        pytest.fail("DOCKER_E2E_DATABASE_URL=postgresql+asyncpg://USER:PASSWORD@127.0.0.1:PORT/DB is needed "
                    "(docker/ci.sh starts a PostgreSQL cluster and sets it)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine answers: docker/ci.sh starts one (dockerd --bridge=none)")
    if not SYSTEM_FASHION_MNIST.exists():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (docker/ci.sh does)")
    uid = uuid.uuid4().hex[:8]
    stack = Stack(uid=uid, home=tmp_path_factory.mktemp("docker-e2e"), database_url=database_url,
                  secrets={"WANDB_API_KEY": f"wandb-fake-{uuid.uuid4().hex}",
                           "PREFECT_API_KEY": f"pnu_fake{uuid.uuid4().hex}"})
    try:
        yield stack
    finally:
        stack.cleanup()
        report = os.environ.get("DOCKER_E2E_REPORT")
        if report:
            Path(report).write_text("\n".join(stack.report) + "\n")


@pytest.fixture(scope="module")
def server(stack):
    port = free_port()
    stack.api_url = f"http://127.0.0.1:{port}/api"
    started = time.monotonic()
    process = stack.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                          stack.env("server", PREFECT_API_DATABASE_CONNECTION_URL=stack.database_url,
                                    PREFECT_UI_ENABLED="false"))
    wait_until_healthy(stack, process)
    stack.say(f"prefect server on PostgreSQL ({re.sub(r':[^:@/]*@', ':***@', stack.database_url)}), "
              f"{stack.api_url}, healthy after {time.monotonic() - started:.0f} s")
    return stack


def read_flow_run(stack: Stack, flow_run_id: str) -> FlowRun:
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def run_sweep(stack: Stack, config: dict, job_variables: dict | None = None) -> FlowRun:
    """`prefect deployment run lr-sweep/lr-sweep --watch`, with job variables as --job-variable."""
    args = [str(BIN / "prefect"), "deployment", "run", "lr-sweep/lr-sweep", "--params", json.dumps({"config": config}),
            "--watch", "--watch-timeout", str(RUN_SECONDS)]
    for key, value in (job_variables or {}).items():
        args += ["--job-variable", f"{key}={json.dumps(value)}"]
    started = time.monotonic()
    result = subprocess.run(args, env=stack.env("client"), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=RUN_SECONDS + 60)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    assert match, f"no flow run created:\n{result.stdout}\n{result.stderr}"
    flow_run = read_flow_run(stack, match.group(1))
    stack.say(f"flow run {flow_run.name} (sweep {config['sweep_id']}): {flow_run.state.type.value} "
              f"after {time.monotonic() - started:.0f} s")
    assert flow_run.state.is_completed(), (f"{flow_run.state}\n{result.stdout[-4000:]}\nworker logs:\n"
                                           + "\n".join(stack.log(n)[-4000:] for n in stack.worker_names))
    return flow_run


def summary_of(runs: Volume, sweep_id: str) -> dict:
    return json.loads((runs.path / sweep_id / "summary.json").read_text())


# --- the image ---------------------------------------------------------------------------------

def test_image_builds_on_the_cpu_base_and_reuses_it(stack):
    stack.image = f"lr-sweep:e2e-{stack.uid}"
    seconds, log = build(stack, stack.image)
    base = re.search(r"on (lr-sweep-base:[0-9a-f]{16})", log).group(1)
    reused = "reusing" in log
    stack.say(f"image build 1 ({'base reused' if reused else 'cold: base built'}): {seconds:.0f} s; "
              + log.strip().splitlines()[-1])
    # A rerun: the base's recipe is unchanged, so it is reused; --no-cache rebuilds every layer of
    # the Dockerfile on it (the pins check, the user, the code), as a change of pyproject.toml would.
    seconds, log = build(stack, f"{stack.image}-rebuild", "--no-cache")
    assert f"reusing {base}" in log, log
    stack.say(f"image build 2 (cached base, Dockerfile without layer cache): {seconds:.0f} s; "
              + log.strip().splitlines()[-1])
    docker("rmi", f"{stack.image}-rebuild")
    stack.images.remove(f"{stack.image}-rebuild")

    who = docker("run", "--rm", "--network", "host", stack.image, "id").strip()
    stack.say(f"docker run --rm {stack.image} id: {who}")
    assert who.startswith(f"uid={USER_ID}(lrsweep) gid={USER_ID}(lrsweep)")
    versions = docker("run", "--rm", "--network", "host", stack.image, "python3", "-c",
                      "import sys, torch, torchvision, prefect; print(sys.version.split()[0], torch.__version__, "
                      "torchvision.__version__, prefect.__version__)").split()
    assert versions[0].startswith("3.11.") and versions[1].startswith("2.14.1") and versions[2].startswith("0.29.1")
    assert versions[3] == "3.9.1"


# --- the deployments and the GPU request --------------------------------------------------------

def test_the_gpu_request_stays_unless_the_run_overrides_it(stack, server):
    stack.make("pools", env=stack.env("client"))
    stack.make("deploy-prebuilt", f"IMAGE={stack.image}", env=stack.env("client"))
    override = stack.job_variables()
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        pool = client.read_work_pool("lr-sweep-gpu")
        deployment = client.read_deployment_by_name("lr-sweep/lr-sweep")
        later = Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=30))  # no worker takes them
        plain = client.create_flow_run_from_deployment(deployment.id, state=later)
        overridden = client.create_flow_run_from_deployment(deployment.id, state=later, job_variables=override)

    async def render(flow_run):
        async with get_client() as client:
            return await DockerWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name=f"render-{stack.uid}")

    engine = docker_sdk.from_env()
    try:
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            configurations = [run_coro_as_sync(render(flow_run)) for flow_run in (plain, overridden)]
            settings = [DockerWorker(work_pool_name="lr-sweep-gpu")._build_container_settings(engine, c)
                        for c in configurations]
        gpu, cpu = settings
        assert configurations[0].image == configurations[1].image == stack.image
        assert gpu["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
        assert gpu["shm_size"] == "8g"
        assert "device_requests" not in cpu and cpu["network_mode"] == "host" and cpu["shm_size"] == "8g"
        assert cpu["volumes"][-1] == DATASET_MOUNT
        # The engine gets the request: without the override, this host cannot start the container.
        # (Without the deployment's volumes: creating the container would create them.)
        container = engine.containers.create(**{**gpu, "command": "true", "name": None, "auto_remove": False,
                                                "volumes": None})
        try:
            with pytest.raises(docker_sdk.errors.APIError, match="nvidia"):
                container.start()
        finally:
            container.remove(force=True)
        stack.say("without the override the flow run's container asks for the GPUs (device_requests "
                  f"{gpu['device_requests']}); the engine here refuses it; with it: network_mode "
                  f"{cpu['network_mode']}, no device request")
    finally:
        engine.close()
        with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
            for flow_run in (plain, overridden):
                client.delete_flow_run(flow_run.id)


@pytest.fixture(scope="module")
def workers(stack, server):
    """Two Docker workers, the fake keys in their environment: the first takes the sweeps and
    trials (two runs at once), the second only trials (one at a time)."""
    names = (f"docker-1-{stack.uid}", f"docker-2-{stack.uid}")
    for name, limit, queues in ((names[0], 2, "default trials"), (names[1], 1, "trials")):
        env = stack.env(name, PREFECT_WORKER_QUERY_SECONDS="2", **stack.secrets)
        stack.start(name, ["make", "-s", "-o", ".venv/.installed", f"BIN={BIN}", "gpu-worker", f"WORKER_NAME={name}",
                           f"WORKER_LIMIT={limit}", f"WORKER_QUEUES={queues}"], env)
    stack.worker_names = names
    return names


# --- sweeps in containers ----------------------------------------------------------------------

def test_a_sweep_runs_in_a_container_as_the_image_user_and_moves_the_alias(stack, workers):
    config = SMOKE | {"learning_rates": [0.001, 0.0001], "sweep_id": f"e2e-docker-1-{stack.uid}"}
    flow_run = run_sweep(stack, config, stack.job_variables())
    assert flow_run.job_variables["network_mode"] == "host"
    assert "device_requests" not in flow_run.job_variables["container_create_kwargs"]

    volumes = {role: stack.snapshot(stack.volume(role)) for role in VOLUME_ROLES}
    for role, volume in volumes.items():
        assert volume.files(), f"nothing written to the {role} volume"
        assert {(m.uid, m.gid) for m in volume.members} == {(USER_ID, USER_ID)}, volume.listing()
    assert any(m.name.endswith("train-images-idx3-ubyte") for m in volumes["data"].files())
    summary = summary_of(volumes["runs"], config["sweep_id"])
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    assert not any(t["cached"] for t in summary["trials"])
    assert list((volumes["runs"].path / config["sweep_id"] / "wandb").glob("offline-run-*"))
    holder = LocalRegistry(volumes["registry"].path).resolve(COLLECTION, ALIAS)
    best = next(t for t in summary["trials"] if t["model"] == summary["best"]["model"])
    assert summary["promotion"]["promoted"] is True and summary["promotion"]["previous"] is None
    assert (str(holder), holder.digest) == (best["model"], best["digest"])
    LocalRegistry(volumes["registry"].path).fetch(holder)  # its files pass the digest check
    stack.first_holder = holder
    stack.say(f"alias {ALIAS!r} -> {holder} (digest {holder.digest[:16]}...)")


def test_a_second_sweep_reuses_the_registry_volume_and_the_alias_stays(stack, workers):
    config = SMOKE | {"learning_rates": [0.001, 0.0001], "sweep_id": f"e2e-docker-2-{stack.uid}"}
    run_sweep(stack, config, stack.job_variables())
    runs, registry = stack.snapshot(stack.volume("runs")), stack.snapshot(stack.volume("registry"))
    summary = summary_of(runs, config["sweep_id"])
    assert [(t["status"], t["cached"]) for t in summary["trials"]] == [("reused", True), ("reused", True)]
    assert summary["promotion"]["promoted"] is False
    holder = LocalRegistry(registry.path).resolve(COLLECTION, ALIAS)
    assert holder == stack.first_holder
    assert len(LocalRegistry(registry.path).versions(COLLECTION)) == 2  # nothing stored twice
    stack.say(f"second sweep: trials cached {[t['cached'] for t in summary['trials']]}, alias stays on {holder} "
              f"({summary['promotion']['reason']})")
    for role in VOLUME_ROLES:
        stack.say(f"volume {stack.volume(role)}:")
        for line in stack.snapshot(stack.volume(role)).listing():
            stack.say(f"    {line}")


def test_dispatch_spreads_the_trials_over_both_docker_workers(stack, workers):
    # Trial runs take their deployment's job variables (not the sweep run's): the GPU deployments
    # are registered again with the CPU host's, and a registry volume of their own.
    job_variables = stack.home / "cpu-host-dispatch.json"
    job_variables.write_text(json.dumps(stack.job_variables(registry_variant="-dispatch"), indent=2))
    stack.make("deploy-prebuilt", f"IMAGE={stack.image}", f"JOB_VARIABLES={job_variables}", env=stack.env("client"))
    config = SMOKE | {"learning_rates": [0.003, 0.0003], "sweep_id": f"e2e-docker-dispatch-{stack.uid}",
                      "dispatch": "deployment"}
    run_sweep(stack, config)
    runs, registry = stack.snapshot(stack.volume("runs")), stack.snapshot(stack.volume("registry", "-dispatch"))
    summary = summary_of(runs, config["sweep_id"])
    trials = summary["trials"]
    assert [t["status"] for t in trials] == ["completed", "completed"]
    assert {t["worker"] for t in trials} == set(workers), "each Docker worker took a trial"
    holder = LocalRegistry(registry.path).resolve(COLLECTION, ALIAS)
    best = next(t for t in trials if t["model"] == summary["best"]["model"])
    assert summary["promotion"]["promoted"] is True
    assert (str(holder), holder.digest) == (best["model"], best["digest"])
    assert {m.uid for m in registry.members} == {USER_ID}
    for trial in trials:
        stack.say(f"dispatch: lr {trial['learning_rate']:g} trained on worker {trial['worker']} -> "
                  f"{trial['model']} (digest {trial['digest'][:16]}...)")
    stack.say(f"dispatch: alias {ALIAS!r} -> {holder}, the best trial's digest")


# --- a user's model in an image derived from lr-sweep's ------------------------------------------

def test_a_user_model_package_in_a_derived_image_sweeps_on_the_docker_worker(stack, workers):
    # examples/Dockerfile as the docs give it, on this test's image, with the classic builder
    # (docker/build-image.sh says why); the build context is the package's folder.
    image = f"lr-sweep-resnet:e2e-{stack.uid}"
    started = time.monotonic()
    stack.run(["docker", "build", "--network", "host", "--file", str(EXAMPLES / "Dockerfile"),
               "--build-arg", f"LR_SWEEP_IMAGE={stack.image}", "--tag", image, str(EXAMPLES)],
              timeout=900, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    stack.images.insert(0, image)  # removed before the image it derives from
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image)) - int(docker("image", "inspect", "-f",
                                                                                 "{{.Size}}", stack.image))
    stack.say(f"derived image {image} (examples/Dockerfile on {stack.image}): {time.monotonic() - started:.0f} s, "
              f"{size / 1e3:+.0f} kB")
    who, where = docker("run", "--rm", "--network", "host", image, "sh", "-c",
                        "id -un; python3 -c 'import resnet_model; print(resnet_model.__file__)'").split()
    assert who == "lrsweep" and where.endswith("site-packages/resnet_model.py"), (who, where)

    config = SMOKE | {"learning_rates": [0.003], "model": USER_MODEL, "model_args": {"width": 4},
                      "sweep_id": f"e2e-docker-resnet-{stack.uid}"}
    flow_run = run_sweep(stack, config, stack.job_variables() | {"image": image})
    assert flow_run.job_variables["image"] == image
    runs, registry = stack.snapshot(stack.volume("runs")), stack.snapshot(stack.volume("registry"))
    summary = summary_of(runs, config["sweep_id"])
    [trial] = summary["trials"]
    assert trial["status"] == "completed" and trial["model"].startswith(f"{USER_COLLECTION}:v")
    assert summary["promotion"]["promoted"] is True and summary["promotion"]["previous"] is None
    holder = LocalRegistry(registry.path).resolve(USER_COLLECTION, ALIAS)
    assert holder is not None and (str(holder), holder.digest) == (trial["model"], trial["digest"])
    record = LocalRegistry(registry.path).fetch(holder).metadata["model_source"]
    # The code the container ran is the example file itself: the same digest as the file here.
    example_digest = ModelSource(f"{EXAMPLES / 'resnet_model.py'}:small_resnet").digest()
    assert (record["spec"], record["kind"], record["args"], record["code_digest"]) == (
        USER_MODEL, "user", {"width": 4}, example_digest)
    if stack.first_holder is not None:  # the CNN's collection on the same registry volume is left alone
        assert LocalRegistry(registry.path).resolve(COLLECTION, ALIAS) == stack.first_holder
    stack.say(f"user model {USER_MODEL} in {image}: alias {ALIAS!r} -> {holder} (code digest "
              f"{record['code_digest'][:23]}..., the digest of examples/resnet_model.py)")


# --- secrets -----------------------------------------------------------------------------------

def test_no_secret_in_the_image_the_volumes_or_the_outputs(stack, workers):
    keys = list(stack.secrets.values())
    found = {}
    history = docker("history", "--no-trunc", stack.image)
    found["docker history --no-trunc"] = [k for k in keys if k in history]
    container = docker("create", "--network", "host", stack.image).strip()
    try:
        export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
        grep = subprocess.run(["grep", "-a", "-c", "-F", *sum((["-e", k] for k in keys), [])], stdin=export.stdout,
                              capture_output=True, text=True, timeout=900)
        export.stdout.close()
        assert export.wait(timeout=60) == 0
        found["image files (docker export | grep)"] = int(grep.stdout.strip() or 0)
    finally:
        docker("rm", "-f", container, check=False)
    scanned = 0
    for name in stack.volumes:
        volume = stack.snapshot(name)
        found[f"volume {name}: link targets"] = [k for k in keys if any(k in m.linkname for m in volume.members)]
        for path in volume.path.rglob("*"):
            if path.is_file():
                scanned += 1
                data = path.read_bytes()
                found[f"volume {name}: {path.name}"] = [k for k in keys if k.encode() in data]
    for name in ("server", *stack.worker_names):  # the containers' output is in the workers' logs
        found[f"{name} log"] = [k for k in keys if k in stack.log(name)]
    leaks = {where: what for where, what in found.items() if what}
    stack.say(f"secret scan: {len(keys)} fake keys (WANDB_API_KEY, PREFECT_API_KEY of the workers) in docker "
              f"history, {stack.image}'s files, {scanned} files of {len(stack.volumes)} volumes, server and "
              f"worker logs: {'found in ' + str(leaks) if leaks else 'none found'}")
    assert not leaks
