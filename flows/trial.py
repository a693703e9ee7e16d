"""The per-trial flow `lr-sweep-trial`: one trial of a sweep, on whichever worker took it.

With `dispatch="deployment"` the sweep submits each (learning rate, seed) trial as a flow run of
a deployment of this flow (flows/dispatch.py), so every worker that polls that deployment's work
pool, on every node, takes trials. The trial returns its outcome as plain JSON data (the
flow's result serializer is JSON: no pickle is written, and the sweep reads it back as JSON
only); a trial that fails or diverges returns a failed outcome too, as data.

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
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed

from flows.config import SweepConfig
from flows.plan import TRIAL_FLOW_NAME, SweepContext, new_sweep_id
from tasks.data import DatasetError, DatasetRef
from tasks.devices import DeviceSlots
from tasks.results import TrialSpec
from tasks.train import failed_outcome, train_model

DEVICE_LIMIT_PREFIX = "lr-sweep-device"
# Set by every Prefect worker in the environment of the flow runs it starts.
WORKER_NAME_VARIABLE = "PREFECT__WORKER_NAME"
# A trial asks for a device that looked free for this long (another trial may have taken it in
# between); with every device busy it looks again after DEVICE_RETRY_SECONDS. Trials last
# minutes, so a few seconds of waiting is cheap.
DEVICE_ACQUIRE_SECONDS = 5.0
DEVICE_RETRY_SECONDS = 2.0

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


@flow(name=TRIAL_FLOW_NAME, log_prints=True, persist_result=True, result_serializer="json")
def lr_sweep_trial(config: SweepConfig, spec: TrialSpec, dataset_fingerprint: str | None = None):
    """One trial of a sweep on whichever worker took it; returns the trial's outcome as JSON data.

    A trial that fails or diverges ends its run Failed, with its failed outcome as the run's
    (JSON) result, so the sweep reports it like a local one."""
    logger = get_run_logger()
    worker = os.environ.get(WORKER_NAME_VARIABLE)
    sweep_id = config.sweep_id or new_sweep_id()  # set by the sweep; a trial run by hand gets its own
    placement = {"worker": worker, "flow_run": str(current_flow_run.id)}
    try:
        context = SweepContext.from_config(config, sweep_id)
        check_fingerprint(context.dataset, dataset_fingerprint)
        devices, per_device = context.devices, context.slots.per_device
        taken = (worker_device(worker, devices, per_device) if worker
                 else contextlib.nullcontext(None))  # run by hand: the process's own device slots
        with taken as device:
            dataset, workspace = context.dataset, context.workspace
            slots = DeviceSlots([device], per_device) if device else context.slots
            logger.info(f"trial {spec.name} of sweep {sweep_id} on worker {worker!r}, "
                        f"device {device or ', '.join(devices)}")
            outcome = train_model(spec, dataset, workspace, slots)
    except Exception as error:
        logger.error(f"trial {spec.name} did not finish: {type(error).__name__}: {error}")
        outcome = failed_outcome(spec, error)
    data = outcome.model_copy(update=placement).model_dump(mode="json")
    if outcome.status != "completed":  # shown as Failed in the UI, its outcome still stored as JSON
        return Failed(message=f"trial {spec.name} {outcome.status}: {outcome.error}", data=data)
    return data
