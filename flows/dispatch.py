"""Per-trial dispatch: every trial of a sweep as its own flow run of a deployment, on any node.

With `dispatch="deployment"` the sweep does not train in its own process: it submits each
(learning rate, seed) trial as a flow run of the per-trial deployment (`trial_deployment`, a
deployment of the `lr-sweep-trial` flow below) with `run_deployment`, so every worker that polls
that deployment's work pool, on every node, takes trials. The sweep waits for the runs, collects
their outcome dicts (the same dicts a local trial returns) and goes on to evaluate and compare as
before. Evaluation fetches each model by reference from the registry, so in a multi-node setup
the registry must be one that every node reaches: `registry="wandb"`, or `registry_dir` on
shared storage mounted at the same path on every node. Outcomes travel back as persisted Prefect
results, which need result storage both sides read: PREFECT_HOME on one machine; on several,
PREFECT_RESULTS_LOCAL_STORAGE_PATH on shared storage or a remote result storage block.

On its worker, a trial takes one device through a Prefect global concurrency limit per worker
and device, `lr-sweep-device:<worker>:<device>` (the per-worker pattern of PrefectHQ/prefect
examples/per_worker_task_concurrency.py), created on first use with `trials_per_device` slots:
trials that land on one GPU node spread over its GPUs, and a crashed trial's slot comes back
when its lease expires. Inside the trial the work is `train_model`, the same task a local sweep
runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run as current_flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import State

from flows.config import SweepConfig
from flows.sweep import failed_outcome, new_sweep_id, sweep_context
from tasks.context import SweepContext
from tasks.data import DatasetError, DatasetRef, prepare_data
from tasks.devices import configure_cpu_threads, resolve_devices, slots_per_device
from tasks.train import TrialSpec, train_model

TRIAL_FLOW_NAME = "lr-sweep-trial"
DEVICE_LIMIT_PREFIX = "lr-sweep-device"
# Set by every Prefect worker in the environment of the flow runs it starts.
WORKER_NAME_VARIABLE = "PREFECT__WORKER_NAME"
# A trial asks for a device that looked free for this long (another trial may have taken it in
# between); with every device busy it looks again after DEVICE_RETRY_SECONDS. Trials last
# minutes, so a few seconds of waiting is cheap.
DEVICE_ACQUIRE_SECONDS = 5.0
DEVICE_RETRY_SECONDS = 2.0
# How often the sweep asks the server whether its trial runs have finished.
TRIAL_POLL_SECONDS = 2.0


class TrialRunFailed(RuntimeError):
    """A trial's flow run ended without an outcome (crashed, cancelled, result unreadable)."""


class TrialFailed(RuntimeError):
    """Raised by a trial that failed or diverged: fails its flow run and carries its outcome dict
    back to the sweep as the run's (persisted) result."""

    def __init__(self, outcome: dict):
        super().__init__(f"trial lr={outcome['learning_rate']:g} seed={outcome['seed']} "
                         f"{outcome['status']}: {outcome['error']}")
        self.outcome = outcome

    def __reduce__(self):  # pickled as its outcome alone, to be rebuilt in the sweep's process
        return type(self), (self.outcome,)


# --- on the worker: the per-trial flow -------------------------------------------------------------

def device_limit_name(worker: str, device: str) -> str:
    return f"{DEVICE_LIMIT_PREFIX}:{worker}:{device}"


def ensure_device_limits(worker: str, devices: list[str], per_device: int) -> list[str]:
    """Create the worker's per-device limits that do not exist yet; existing ones are kept, so an
    operator's `prefect gcl update` survives."""
    names = [device_limit_name(worker, device) for device in devices]
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):  # another trial was quicker
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=per_device))
    return names


def first_free_device(names: list[str]) -> int | None:
    """Index of the first limit with a free slot, read without taking anything."""
    with get_client(sync_client=True) as client:
        for index, name in enumerate(names):
            limit = client.read_global_concurrency_limit_by_name(name)
            if not limit.active or limit.active_slots < limit.limit:
                return index
    return None


@contextlib.contextmanager
def worker_device(worker: str, devices: list[str], per_device: int) -> Iterator[str]:
    """Hold one slot of one of this worker's devices for the duration of the block.

    Free slots are looked up first and only a free one is asked for: a refused acquisition is
    logged as an error by Prefect, and should happen only when another trial wins a race."""
    names = ensure_device_limits(worker, devices, per_device)
    while True:
        index = first_free_device(names)
        if index is not None:
            entered = False
            try:
                with concurrency(names[index], occupy=1, timeout_seconds=DEVICE_ACQUIRE_SECONDS,
                                 strict=True):
                    entered = True
                    yield devices[index]
                return
            except TimeoutError:
                if entered:  # raised by the trial itself, not by a busy device
                    raise
        time.sleep(DEVICE_RETRY_SECONDS)


def check_fingerprint(dataset: DatasetRef, expected: str | None) -> None:
    if expected is not None and dataset.fingerprint != expected:
        raise DatasetError(
            f"the data on this node (fingerprint {dataset.fingerprint[:12]}…) differs from the "
            f"sweep's ({expected[:12]}…): every node must train on the same dataset files")


@flow(name=TRIAL_FLOW_NAME, log_prints=True, persist_result=True)
def lr_sweep_trial(config: SweepConfig, spec: TrialSpec, dataset_fingerprint: str | None = None) -> dict:
    """One trial of a sweep on whichever worker took it; returns the trial's outcome dict.

    A trial that fails or diverges fails its flow run with TrialFailed, which still hands the
    outcome back, so the sweep reports it like a local one."""
    logger = get_run_logger()
    worker = os.environ.get(WORKER_NAME_VARIABLE)
    sweep_id = config.sweep_id or new_sweep_id()  # set by the sweep; a trial run by hand gets its own
    placement = {"worker": worker, "flow_run": current_flow_run.id}
    try:
        dataset = prepare_data(config.dataset, config.data_dir, config.val_size, config.split_seed,
                               config.train_limit)
        check_fingerprint(dataset, dataset_fingerprint)
        devices = resolve_devices(config.device)
        configure_cpu_threads(devices)
        per_device = slots_per_device(devices, config.trials_per_device)
        taken = (worker_device(worker, devices, per_device) if worker
                 else contextlib.nullcontext(None))  # run by hand: the process's own device slots
        with taken as device:
            context = sweep_context(config, sweep_id, [device] if device else devices)
            logger.info(f"trial {spec.name} of sweep {sweep_id} on worker {worker!r}, "
                        f"device {device or ', '.join(devices)}")
            outcome = train_model(spec, dataset, context)
    except Exception as error:
        raise TrialFailed(failed_outcome(spec, error) | placement) from error
    return outcome | placement


# --- in the sweep: submit, wait, collect -----------------------------------------------------------

def trial_parameters(config: SweepConfig, sweep_id: str, context: SweepContext, spec: TrialSpec,
                     dataset: DatasetRef) -> dict:
    """The trial's config is the sweep's, with the sweep id fixed and the shared directories made
    absolute, so every trial writes into the same sweep and registry whatever its worker's cwd."""
    trial_config = config.model_copy(update={
        "sweep_id": sweep_id, "registry_dir": context.registry_dir,
        "output_dir": context.sweep_dir.parent})
    return {"config": trial_config, "spec": spec, "dataset_fingerprint": dataset.fingerprint}


def submit_trials(config: SweepConfig, sweep_id: str, context: SweepContext, specs: list[TrialSpec],
                  dataset: DatasetRef) -> list[FlowRun]:
    if not PREFECT_API_URL.value():
        raise ValueError(
            "dispatch='deployment' needs a Prefect server that workers poll: set PREFECT_API_URL "
            "(e.g. `make server`, then PREFECT_API_URL=http://127.0.0.1:4200/api), or use "
            "dispatch='local'")
    runs = []
    for spec in specs:
        try:
            runs.append(run_deployment(
                config.trial_deployment, timeout=0, flow_run_name=f"{sweep_id}-{spec.name}",
                parameters=trial_parameters(config, sweep_id, context, spec, dataset),
                tags=[f"sweep:{sweep_id}"]))
        except ObjectNotFound:
            raise ValueError(
                f"trial_deployment {config.trial_deployment!r} does not exist on the Prefect "
                f"server at {PREFECT_API_URL.value()}: deploy it from prefect.yaml first "
                f"(`prefect --no-prompt deploy --name {config.trial_deployment}`)") from None
    return runs


def wait_until_final(flow_run_id) -> FlowRun:
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(TRIAL_POLL_SECONDS)


def outcome_of(spec: TrialSpec, flow_run: FlowRun) -> dict:
    """The outcome dict the trial handed back, or a failed outcome saying why there is none."""
    state: State = flow_run.state
    reason = f"flow run {flow_run.name} ended {state.type.value}: {state.message}"
    if state.is_completed() or state.is_failed():
        try:
            result = state.result(raise_on_failure=False)
        except Exception as error:  # e.g. the worker's result storage is not reachable from here
            result = error
            reason += (f"; its result could not be read ({type(error).__name__}: {error}): result "
                       "storage must be shared by the sweep and its trials")
        if isinstance(result, TrialFailed):
            return result.outcome
        if isinstance(result, dict):
            return result
    return failed_outcome(spec, TrialRunFailed(reason)) | {"flow_run": str(flow_run.id)}


def dispatch_trials(config: SweepConfig, sweep_id: str, context: SweepContext, specs: list[TrialSpec],
                    dataset: DatasetRef) -> list[dict]:
    """Run every trial as a flow run of `config.trial_deployment`; outcomes in `specs` order."""
    logger = get_run_logger()
    runs = submit_trials(config, sweep_id, context, specs, dataset)
    logger.info(f"dispatched {len(runs)} trial(s) to deployment {config.trial_deployment!r}; "
                f"waiting for the workers of its pool: {', '.join(run.name for run in runs)}")
    outcomes = []
    for spec, run in zip(specs, runs):
        finished = wait_until_final(run.id)
        outcome = outcome_of(spec, finished)
        logger.info(f"trial {spec.name}: {outcome['status']} on worker {outcome.get('worker')!r}")
        outcomes.append(outcome)
    return outcomes
