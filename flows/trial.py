"""The per-trial flow `lr-sweep-trial`: one trial of a sweep, on whichever worker took it.

With `dispatch="deployment"` the sweep submits each (learning rate, seed) trial as a flow run of
a deployment of this flow (flows/dispatch.py), so every worker that polls that deployment's work
pool, on every node, takes trials. The trial returns its outcome as plain JSON data (the
flow's result serializer is JSON: no pickle is written, and the sweep reads it back as JSON
only); a trial that fails or diverges returns a failed outcome too, as data.

On its worker, a trial takes one device through a Prefect global concurrency limit per worker
and device, `lr-sweep-device:<worker>:<device>` (the per-worker pattern of PrefectHQ/prefect
examples/per_worker_task_concurrency.py), created on first use with `trials_per_device` slots:
trials that land on one GPU node spread over its GPUs. A crashed trial's slot comes back as soon
as the sweep or a waiting trial sees that its run ended (its lease is recorded in a variable),
not only when the lease expires. Inside the trial the work is `train_model`, the same task a local sweep
runs.

A run the sweep gave up on while it trained (taken for lost in a network split, then re-run
elsewhere) may come back. It reads its own state every STILL_WANTED_SECONDS while it trains and,
once that state is final, stops at the end of its next epoch and ends as SUPERSEDED_STATE: its
re-run owns the trial and its checkpoint from then on, and two runs never train one trial for long.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from typing import Callable, Iterator
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, VariableCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, FlowRun
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from prefect.logging import get_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed

from flows.config import SweepConfig
from flows.plan import TRIAL_FLOW_NAME, SweepContext, new_sweep_id
from flows.prefect_adapter import renewed_lease
from flows.trial_runs import TRIAL_FAILED_STATE, server_unreachable
from tasks.data.dataset import DatasetRef
from tasks.data.spec import DatasetError
from tasks.reporting.artifact_keys import artifact_key
from tasks.results import TrialSpec
from tasks.training.devices import DeviceSlots
from tasks.training.train import failed_outcome, train_model

DEVICE_LIMIT_PREFIX = "lr-sweep-device"
# Set by every Prefect worker in the environment of the flow runs it starts.
WORKER_NAME_VARIABLE = "PREFECT__WORKER_NAME"
# With every device busy a trial looks again after DEVICE_RETRY_SECONDS. Trials last minutes,
# so a few seconds of waiting is cheap.
DEVICE_RETRY_SECONDS = 2.0
# A device slot's lease, renewed every 3/4 of it while the trial trains (Prefect's default).
LEASE_SECONDS = 300.0
# A training trial reads its own run's state this often: one small request, against epochs of
# seconds to minutes.
STILL_WANTED_SECONDS = 10.0
# The name of the Failed state of a run that stopped because it had been given up on.
SUPERSEDED_STATE = "Superseded"

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


# --- who holds which slot ---------------------------------------------------------------------
# A trial that takes a slot records its lease in a Prefect variable named after its flow run, so
# that the slot of a run that dies holding it (SIGKILL, a lost container) is given back as soon
# as that is known (by the sweep, or by a trial waiting for the device), not when the lease
# expires minutes later. Prefect's API does not list a limit's leases or their holders.
SLOT_RECORD_PREFIX = "lr-sweep-slot-"


def slot_record_name(flow_run_id) -> str:
    return f"{SLOT_RECORD_PREFIX}{flow_run_id}"


def take_slot(client, name: str, flow_run_id) -> UUID | None:
    """A lease on one slot of limit `name`, or None when every slot is taken."""
    holder = None if flow_run_id is None else ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id)
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS, holder=holder)
    except PrefectHTTPStatusError as error:
        if error.response.status_code == 423:  # locked: another trial was quicker
            return None
        raise
    return UUID(response.json()["lease_id"])


def record_slot(client, flow_run_id, name: str, lease: UUID) -> None:
    if flow_run_id is not None:
        client.create_variable(VariableCreate(name=slot_record_name(flow_run_id),
                                              value={"limit": name, "lease": str(lease)}))


def release_slot_of(flow_run_id) -> str | None:
    """Give back the device slot flow run `flow_run_id` holds; the limit's name, or None if it
    holds none. Whoever deletes the record releases the slot, so it is released once."""
    name = slot_record_name(flow_run_id)
    with get_client(sync_client=True) as client:
        record = client.read_variable_by_name(name)
        if record is None:
            return None
        try:
            client.delete_variable_by_name(name)
        except ObjectNotFound:  # released meanwhile by someone else
            return None
        client.release_concurrency_slots_with_lease(UUID(record.value["lease"]))
    return record.value["limit"]


def holders_of(names: list[str]) -> list[tuple[FlowRun | None, str]]:
    """(flow run, limit) of every recorded slot holder of these limits; None: the run is gone."""
    holders = []
    with get_client(sync_client=True) as client:
        for record in client.read_variables():
            if record.name.startswith(SLOT_RECORD_PREFIX) and isinstance(record.value, dict) \
                    and record.value.get("limit") in names:
                flow_run_id = record.name.removeprefix(SLOT_RECORD_PREFIX)
                try:
                    holders.append((client.read_flow_run(UUID(flow_run_id)), record.value["limit"]))
                except (ObjectNotFound, ValueError):
                    holders.append((None, record.value["limit"]))
    return holders


def reclaim_dead_slots(names: list[str], say: Callable[[str], None]) -> bool:
    """Release the slots of these limits held by runs that have ended (crashed, cancelled by
    hand): True when one came free. Says what the trial is waiting for meanwhile."""
    reclaimed = False
    holders = holders_of(names)
    for run, limit in holders:
        if run is None or (run.state is not None and run.state.is_final()):
            ended = run.state.name if run is not None and run.state is not None else "deleted"
            say(f"waiting for a device slot held by a crashed run ({run.name if run else 'gone'}, {ended}): "
                "reclaiming it")
            if run is not None and release_slot_of(run.id) is not None:
                reclaimed = True
    if not reclaimed and holders:
        say(f"waiting for a device slot held by {', '.join(run.name for run, _ in holders if run)}")
    return reclaimed


@contextlib.contextmanager
def worker_device(worker: str, devices: list[str], per_device: int,
                  say: Callable[[str], None] = lambda status: None) -> Iterator[str]:
    """Hold one slot of one of this worker's devices for the duration of the block.

    Free slots are looked up first and only a free one is asked for; with every slot taken, the
    slots of runs that died holding them are reclaimed. A lease that cannot be renewed (the
    server is away) does not stop the trial: Prefect logs it and the trial trains on (a slot it
    held that long may then go to another trial: two share a device for a while)."""
    names = ensure_device_limits(worker, devices, per_device)
    flow_run_id = current_flow_run.id
    while True:
        index = first_free_device(names)
        if index is None and reclaim_dead_slots(names, say):
            index = first_free_device(names)
        lease = None
        if index is not None:
            with get_client(sync_client=True) as client:
                lease = take_slot(client, names[index], flow_run_id)
                if lease is not None:
                    record_slot(client, flow_run_id, names[index], lease)
        if lease is None:
            time.sleep(DEVICE_RETRY_SECONDS)
            continue
        try:
            with renewed_lease(lease, LEASE_SECONDS):
                yield devices[index]
        finally:
            give_back(flow_run_id, lease)
        return


class TrialSuperseded(Exception):
    """The trial's run was ended by someone else (the sweep, an operator) while it trained."""


@contextlib.contextmanager
def still_wanted(flow_run_id) -> Iterator[Callable[[], None]]:
    """A check to call between epochs: it raises TrialSuperseded once this run's state was set
    final from outside. The state is read by a thread every STILL_WANTED_SECONDS, so the check
    itself costs nothing; an unreachable server is no verdict (the trial trains on)."""
    ended: dict = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(STILL_WANTED_SECONDS):
            try:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(flow_run_id).state
            except Exception as error:
                if server_unreachable(error):
                    continue
                trial_logger().warning(f"no longer watching this run's state ({type(error).__name__}: {error})")
                return
            if state is not None and state.is_final():
                ended["state"] = state
                return

    def check() -> None:
        if (state := ended.get("state")) is not None:
            raise TrialSuperseded(f"set {state.name} while it trained: {state.message}")

    # The thread runs in a copy of this context, so it talks to this run's server and logs to it.
    watcher = threading.Thread(target=contextvars.copy_context().run, args=(watch,), daemon=True,
                               name=f"still-wanted-{flow_run_id}")
    watcher.start()
    try:
        yield check
    finally:
        stop.set()


def trial_logger():
    """The flow run's logger (its lines reach the UI), or Prefect's own outside a flow run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("lr-sweep.trial")


def give_back(flow_run_id, lease: UUID) -> None:
    """Release a slot at the end of a trial. With the server away it is left to its lease, which
    expires within LEASE_SECONDS (its record is then cleared by the next trial that waits): the
    trial's result is not lost for it."""
    try:
        with get_client(sync_client=True) as client:
            with contextlib.suppress(ObjectNotFound):
                client.delete_variable_by_name(slot_record_name(flow_run_id))
            client.release_concurrency_slots_with_lease(lease)
    except Exception as error:
        if not server_unreachable(error):
            raise
        trial_logger().warning(f"device slot not released ({type(error).__name__}: {error}); its lease "
                                 f"expires within {LEASE_SECONDS:.0f} s")


def slot_wait_reporter(spec: TrialSpec) -> Callable[[str], None]:
    """What the trial waits for before it gets a device, as a progress artifact of its run (made
    at the first wait) and a log line each time it changes."""
    shown: dict = {}

    def say(status: str) -> None:
        if shown.get("status") == status:
            return
        get_run_logger().info(f"trial {spec.name}: {status}")
        description = f"{spec.name}: {status}"
        if "artifact" not in shown:
            shown["artifact"] = create_progress_artifact(0.0, key=artifact_key("slot", spec.name),
                                                         description=description)
        else:
            update_progress_artifact(shown["artifact"], 0.0, description=description)
        shown["status"] = status

    return say


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
        taken = (worker_device(worker, devices, per_device, slot_wait_reporter(spec)) if worker
                 else contextlib.nullcontext(None))  # run by hand: the process's own device slots
        with taken as device, still_wanted(current_flow_run.id) as check:
            dataset, workspace = context.dataset, context.workspace
            slots = DeviceSlots([device], per_device) if device else context.slots
            logger.info(f"trial {spec.name} of sweep {sweep_id} on worker {worker!r}, "
                        f"device {device or ', '.join(devices)}")
            outcome = train_model(spec, dataset, workspace, slots, still_wanted=check)
    except TrialSuperseded as given_up:  # its re-run has the trial: no outcome of this run counts
        message = f"trial {spec.name} stopped: this run was {given_up}"
        logger.warning(message)
        return Failed(name=SUPERSEDED_STATE, message=message)
    except Exception as error:
        if server_unreachable(error):  # no verdict on the trial: the run ends without an outcome
            raise                      # and the sweep runs it again, from its checkpoint
        logger.error(f"trial {spec.name} did not finish: {type(error).__name__}: {error}")
        outcome = failed_outcome(spec, error)
    data = outcome.model_copy(update=placement).model_dump(mode="json")
    if not outcome.has_model:  # shown as Failed in the UI, its outcome still stored as JSON
        return Failed(message=f"trial {spec.name} {outcome.status}: {outcome.error}", data=data,
                      name=TRIAL_FAILED_STATE)
    return data
