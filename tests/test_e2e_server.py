"""End to end on a real Prefect server, the way a user deploys the sweep.

`prefect server start` on 127.0.0.1 (a free port, its own SQLite database), `make pools`,
`make deploy-local`, process workers started with `prefect worker start`, sweeps started with
`prefect deployment run ... --watch`; real Fashion-MNIST, real training, real registry. Then the
dispatch mode: the sweep submits each trial to `lr-sweep-trial/trial-local`, two trial workers take
them. Then the GPU deployments, registered from a prebuilt image (`make deploy-prebuilt`) on the
Docker pool `make pools` created, rendered for a real flow run as a Docker worker would. Every
process started here is stopped by its id at the end.
"""

import json
import re
import threading
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect_docker.worker import DockerWorkerJobConfiguration

from flows.trial import device_limit_name, worker_device
from models.local_registry import LocalRegistry
from tests.stack import BIN, Stack, deployed_stack

pytestmark = pytest.mark.slow

RUN_SECONDS = 300
TRIAL_WORKERS = ("trial-worker-1", "trial-worker-2")
SMOKE = {"epochs": 1, "train_limit": 1000, "val_size": 2000, "device": "cpu"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with deployed_stack(tmp_path_factory.mktemp("prefect-e2e")) as stack:
        yield stack


def run_deployment_cli(stack: Stack, name: str, config: dict) -> str:
    """`prefect deployment run NAME --params ... --watch`; returns the flow run id."""
    output = stack.run(str(BIN / "prefect"), "deployment", "run", name, "--params", json.dumps({"config": config}),
                       "--watch", "--watch-timeout", str(RUN_SECONDS), timeout=RUN_SECONDS + 60)
    return re.search(r"UUID:\s*([0-9a-f-]{36})", output).group(1)


def read_flow_run(stack: Stack, flow_run_id: str):
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_local_deployment_runs_the_sweep_and_moves_the_alias(stack, fashion_data_dir):
    registry_dir = stack.home / "registry"
    config = SMOKE | {"learning_rates": [0.001, 0.0001], "data_dir": str(fashion_data_dir), "sweep_id": "e2e-local",
                      "output_dir": str(stack.home / "runs"), "registry_dir": str(registry_dir)}
    assert not registry_dir.exists()  # so no model holds the alias before the run
    flow_run = read_flow_run(stack, run_deployment_cli(stack, "lr-sweep/local", config))
    assert flow_run.state.is_completed(), flow_run.state
    summary = json.loads((stack.home / "runs" / "e2e-local" / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    holder = LocalRegistry(registry_dir).resolve("fashion-mnist-cnn", "production")
    assert holder is not None and str(holder) == summary["best"]["model"]
    assert summary["promotion"]["promoted"] is True and summary["promotion"]["previous"] is None


def test_dispatch_spreads_the_trials_over_the_workers_of_the_pool(stack, fashion_data_dir):
    # One flow run at a time each, on the trials queue: a worker busy with one trial leaves the
    # next to the other, and the sweep's own run stays with the sweep worker.
    for name in TRIAL_WORKERS:
        stack.worker(name, queue="trials", limit=1)
    registry_dir = stack.home / "registry-dispatch"
    # 10 diverges within its first steps (Adam): a failed trial's outcome must come back too.
    config = SMOKE | {"learning_rates": [0.003, 10.0], "data_dir": str(fashion_data_dir),
                      "sweep_id": "e2e-dispatch", "output_dir": str(stack.home / "runs"),
                      "registry_dir": str(registry_dir), "dispatch": "deployment"}  # trial-local: same pool
    flow_run = read_flow_run(stack, run_deployment_cli(stack, "lr-sweep/local", config))
    assert flow_run.state.is_completed(), flow_run.state

    summary = json.loads((stack.home / "runs" / "e2e-dispatch" / "summary.json").read_text())
    trials = summary["trials"]
    assert [(t["learning_rate"], t["status"]) for t in trials] == [(0.003, "completed"), (10.0, "diverged")]
    assert trials[0]["evaluation"] and trials[0]["device"] == "cpu"
    assert trials[1]["error"].startswith("TrialDiverged") and trials[1]["model"] is None
    assert {t["worker"] for t in trials} == set(TRIAL_WORKERS), "each worker took one trial"
    holder = LocalRegistry(registry_dir).resolve("fashion-mnist-cnn", "production")
    assert str(holder) == summary["best"]["model"] == trials[0]["model"]

    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["sweep:e2e-dispatch"])))
        limits = {name: client.read_global_concurrency_limit_by_name(device_limit_name(name, "cpu"))
                  for name in TRIAL_WORKERS}
    states = {run.name: run.state.type.value for run in runs}
    assert states == {"e2e-dispatch-lr0.003-seed0": "COMPLETED", "e2e-dispatch-lr10-seed0": "FAILED"}
    assert all(run.parent_task_run_id for run in runs)  # shown as subflows of the sweep
    for limit in limits.values():  # created by the trials, one slot per device, released
        assert (limit.limit, limit.active_slots) == (1, 0)
    by_name = {run.name: run for run in runs}
    print("\ndispatch spread:")
    for trial in trials:
        run = by_name[f"e2e-dispatch-lr{trial['learning_rate']:g}-seed0"]
        print(f"  lr {trial['learning_rate']:g}: {trial['status']} on worker {trial['worker']}, "
              f"flow run {run.start_time:%H:%M:%S}-{run.end_time:%H:%M:%S}")


def test_worker_device_slots_give_each_trial_its_own_device(stack):
    """Two GPUs, one trial each: the third trial on that worker waits for a free GPU."""
    devices = ["cuda:0", "cuda:1"]
    taken_later = []

    def third_trial():  # settings are per thread: this one needs the server too
        with temporary_settings({PREFECT_API_URL: stack.api_url}), worker_device("gpu-node-9", devices, 1) as device:
            taken_later.append((device, time.monotonic()))

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        with worker_device("gpu-node-9", devices, 1) as first, worker_device("gpu-node-9", devices, 1) as second:
            assert (first, second) == ("cuda:0", "cuda:1")
            waiting = threading.Thread(target=third_trial)
            waiting.start()
            time.sleep(4)
            assert taken_later == []  # both GPUs busy
            released = time.monotonic()
        waiting.join(timeout=60)
    assert len(taken_later) == 1 and taken_later[0][0] in devices and taken_later[0][1] >= released
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        limits = [client.read_global_concurrency_limit_by_name(device_limit_name("gpu-node-9", d)) for d in devices]
    assert [(limit.limit, limit.active_slots) for limit in limits] == [(1, 0), (1, 0)]


def test_gpu_deployments_from_a_prebuilt_image_render_their_gpu_request(stack):
    image = "registry.invalid/lr-sweep:e2e"
    stack.make("deploy-prebuilt", f"IMAGE={image}")
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        pool = client.read_work_pool("lr-sweep-gpu")
        sweep = client.read_deployment_by_name("lr-sweep/lr-sweep")
        trial = client.read_deployment_by_name("lr-sweep-trial/trial-gpu")
        local = client.read_deployment_by_name("lr-sweep/local")
        flow_run = client.create_flow_run_from_deployment(sweep.id)
    assert pool.type == "docker" and "container_create_kwargs" in pool.base_job_template["job_configuration"]
    assert (sweep.work_pool_name, trial.work_pool_name, trial.work_queue_name) == ("lr-sweep-gpu", "lr-sweep-gpu", "trials")
    assert [s.active for s in sweep.schedules] == [False] and [s.active for s in local.schedules] == [False]

    async def render():
        async with get_client() as client:
            return await DockerWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="gpu-node-1")

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        configuration = run_coro_as_sync(render())
    assert configuration.image == image
    assert configuration.container_create_kwargs == {
        "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}], "shm_size": "8g"}
    assert configuration.volumes == ["lr-sweep-data:/opt/lr-sweep/data", "lr-sweep-registry:/opt/lr-sweep/registry",
                                     "lr-sweep-runs:/opt/lr-sweep/runs"]
    assert configuration.command == "prefect flow-run execute"


def test_lr_sweep_serve_runs_what_the_ui_starts_and_names_it_after_the_sweep(stack, fashion_data_dir):
    """`lr-sweep serve` (flow.serve, no pool or worker) registers lr-sweep/lr-sweep with its
    nightly schedule off; a run started as the UI's Run form starts it completes there."""
    stack.start("serve", str(BIN / "lr-sweep"), "serve")
    deadline = time.monotonic() + 120
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        while True:
            try:
                deployment = client.read_deployment_by_name("lr-sweep/lr-sweep")
                break
            except ObjectNotFound:
                assert time.monotonic() < deadline, stack.log("serve")
                time.sleep(1)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        assert not any(s.active for s in deployment.schedules)
    config = SMOKE | {"learning_rates": [0.001], "data_dir": str(fashion_data_dir), "sweep_id": "e2e-serve",
                      "output_dir": str(stack.home / "runs"), "registry_dir": str(stack.home / "registry-serve")}
    flow_run = read_flow_run(stack, run_deployment_cli(stack, "lr-sweep/lr-sweep", config))
    assert flow_run.state.is_completed(), stack.log("serve")
    assert flow_run.name == "lr-sweep e2e-serve"
