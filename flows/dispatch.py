"""Per-trial dispatch, the sweep's side: each trial as a flow run of the per-trial deployment.

With `dispatch="deployment"` the sweep submits each (learning rate, seed) trial as a flow run of
the trial deployment (a deployment of flows/trial.py's `lr-sweep-trial`: `trial_deployment`,
or the one on the sweep's own work pool) with `run_deployment`,
so every worker that polls that deployment's work pool, on every node, takes trials. The sweep
waits for the runs until `dispatch_timeout_minutes`, reads each outcome back as JSON and goes
on to evaluate and compare as a local sweep does.

Trust: outcomes are read as plain JSON from the result file the trial wrote (its declared
serializer must be JSON; no Prefect deserializer, so nothing written to the shared result folder
can make the sweep unpickle or import anything). Models are then fetched by reference and
digest from the sweep's registry: in a multi-node setup that registry must be one every node
reaches (`registry="wandb"`, or `registry_dir` on shared storage at the same path everywhere);
a trial whose model (by digest) is not there stops the sweep before anything is promoted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment as current_deployment
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled

from flows.config import SweepConfig
from flows.plan import TRIAL_FLOW_NAME
from models.registry import ModelRegistry
from tasks.data import DatasetRef
from tasks.results import TrialOutcome, TrialSpec
from tasks.train import failed_outcome
from tasks.workspace import Workspace

# How often the sweep asks the server whether its trial runs have finished.
TRIAL_POLL_SECONDS = 2.0


class TrialRunFailed(RuntimeError):
    """A trial's flow run ended without an outcome (crashed, cancelled, late, result unreadable)."""


class RegistryNotShared(RuntimeError):
    """A dispatched trial's model is not in the sweep's registry under its digest."""


def trial_parameters(config: SweepConfig, workspace: Workspace, spec: TrialSpec, dataset: DatasetRef) -> dict:
    """The trial's config is the sweep's, with the sweep id fixed and the shared directories made
    absolute, so every trial writes into the same sweep and registry whatever its worker's cwd."""
    trial_config = config.model_copy(update={
        "sweep_id": workspace.sweep_id, "registry_dir": workspace.registry.directory,
        "output_dir": workspace.sweep_dir.parent})
    return {"config": trial_config, "spec": spec, "dataset_fingerprint": dataset.fingerprint}


def trial_deployment_of(config: SweepConfig) -> str:
    """The deployment trials go to: `trial_deployment` when set, else the lr-sweep-trial
    deployment on the work pool the sweep itself runs on (lr-sweep/local -> trial-local,
    lr-sweep/lr-sweep -> trial-gpu), so each sweep deployment dispatches where it runs."""
    if config.trial_deployment:
        return config.trial_deployment
    if current_deployment.id is None:
        raise ValueError("dispatch='deployment' outside a deployment needs trial_deployment "
                         "(e.g. lr-sweep-trial/trial-local)")
    with get_client(sync_client=True) as client:
        pool = client.read_deployment(current_deployment.id).work_pool_name
        candidates = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[TRIAL_FLOW_NAME])),
                                             work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
    if len(candidates) != 1:
        raise ValueError(f"trial_deployment: {len(candidates)} {TRIAL_FLOW_NAME} deployments on work pool "
                         f"{pool!r} ({', '.join(d.name for d in candidates) or 'none'}); deploy one "
                         "(`make deploy-local` or `make deploy`) or name it with trial_deployment")
    return f"{TRIAL_FLOW_NAME}/{candidates[0].name}"


def submit_trials(config: SweepConfig, deployment: str, workspace: Workspace, specs: list[TrialSpec],
                  dataset: DatasetRef) -> list[FlowRun]:
    runs = []
    for spec in specs:
        try:
            runs.append(run_deployment(
                deployment, timeout=0, flow_run_name=f"{workspace.sweep_id}-{spec.name}",
                parameters=trial_parameters(config, workspace, spec, dataset),
                tags=[f"sweep:{workspace.sweep_id}"]))
        except ObjectNotFound:
            raise ValueError(
                f"trial_deployment {deployment!r} does not exist on the Prefect "
                f"server at {PREFECT_API_URL.value()}: deploy it from prefect.yaml first "
                f"(`prefect --no-prompt deploy --name {deployment}`)") from None
    return runs


def queue_of(deployment_name: str) -> str:
    """'pool POOL, queue QUEUE' of a deployment, for messages about runs nobody took."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
    return f"work pool {deployment.work_pool_name!r}, queue {deployment.work_queue_name!r}"


def wait_until_final(runs: list[FlowRun], deadline: float, queue: str) -> dict:
    """Each run's final FlowRun, or the reason it has none by the deadline (it is then cancelled,
    so a worker that turns up later does not start it)."""
    finished: dict = {}
    with get_client(sync_client=True) as client:
        while True:
            for run in runs:
                if run.id not in finished:
                    current = client.read_flow_run(run.id)
                    if current.state is not None and current.state.is_final():
                        finished[run.id] = current
            if len(finished) == len(runs):
                return finished
            if time.monotonic() > deadline:
                break
            time.sleep(TRIAL_POLL_SECONDS)
        for run in runs:
            if run.id not in finished:
                current = client.read_flow_run(run.id)
                state = current.state
                waited = ("no worker took it (it is Late)" if state is not None and state.is_scheduled()
                          else f"it was still {state.name if state else 'pending'}")
                finished[run.id] = TrialRunFailed(
                    f"flow run {current.name} did not finish within the dispatch timeout: {waited}; "
                    f"start a worker on {queue} or raise dispatch_timeout_minutes")
                client.set_flow_run_state(run.id, Cancelled(message="the sweep stopped waiting"), force=True)
    return finished


def read_outcome_json(flow_run: FlowRun) -> dict:
    """The trial's result as plain JSON, read from its result file without Prefect's deserializer
    (which would honour whatever serializer the record names)."""
    metadata = flow_run.state.data
    serializer = getattr(getattr(metadata, "serializer", None), "type", None)
    if serializer != "json":
        raise TrialRunFailed(f"flow run {flow_run.name}: its result is stored with serializer "
                             f"{serializer!r}, not JSON; it is not read")
    if metadata.storage_block_id is None:
        data = Path(metadata.storage_key).read_bytes()
    else:  # remote result storage (e.g. S3): a block both the trial and the sweep reach
        with get_client(sync_client=True) as client:
            document = client.read_block_document(metadata.storage_block_id)
        data = Block._from_block_document(document).read_path(metadata.storage_key)
    return json.loads(data)


def outcome_of(spec: TrialSpec, flow_run: FlowRun | TrialRunFailed) -> TrialOutcome:
    """The outcome the trial handed back, or a failed outcome saying why there is none."""
    if isinstance(flow_run, TrialRunFailed):
        return failed_outcome(spec, flow_run)
    state = flow_run.state
    if state.is_completed() or (state.is_failed() and state.data is not None):
        try:
            return TrialOutcome.model_validate(read_outcome_json(flow_run))
        except Exception as error:  # unreadable, not shared between the nodes, not an outcome
            reason = (f"flow run {flow_run.name} completed but its outcome could not be read "
                      f"({type(error).__name__}: {error}): result storage must be shared by the "
                      "sweep and its trials")
    else:
        reason = f"flow run {flow_run.name} ended {state.type.value}: {state.message}"
    return failed_outcome(spec, TrialRunFailed(reason)).model_copy(update={"flow_run": str(flow_run.id)})


def require_shared_registry(trials: list[TrialOutcome], registry: ModelRegistry, where: str) -> None:
    """Every completed trial's model must be in the sweep's registry with the trial's digest."""
    for trial in trials:
        if trial.status != "completed":
            continue
        found = registry.resolve(trial.model.collection, trial.model.version)
        if found is None or found.digest != trial.model.digest:
            holder = "nothing" if found is None else f"another model (digest {found.digest[:12]}…)"
            raise RegistryNotShared(
                f"trial {trial.name} stored {trial.model.short} on worker {trial.worker!r}, but the "
                f"sweep's registry {where} holds {holder} under that name: the registry is not "
                "shared between the nodes. Put registry_dir on storage every node mounts at the "
                "same path, or use registry='wandb'. Nothing was promoted.")


def dispatch_trials(config: SweepConfig, workspace: Workspace, specs: list[TrialSpec],
                    dataset: DatasetRef) -> list[TrialOutcome]:
    """Run every trial as a flow run of the trial deployment; outcomes in `specs` order."""
    logger = get_run_logger()
    if not PREFECT_API_URL.value():
        raise ValueError(
            "dispatch='deployment' needs a Prefect server that workers poll: set PREFECT_API_URL "
            "(e.g. `make server`, then PREFECT_API_URL=http://127.0.0.1:4200/api), or use "
            "dispatch='local'")
    deployment = trial_deployment_of(config)
    runs = submit_trials(config, deployment, workspace, specs, dataset)
    logger.info(f"dispatched {len(runs)} trial(s) to deployment {deployment!r}; "
                f"waiting for the workers of its pool: {', '.join(run.name for run in runs)}")
    deadline = time.monotonic() + 60 * config.dispatch_timeout_minutes
    finished = wait_until_final(runs, deadline, queue_of(deployment))
    outcomes = []
    for spec, run in zip(specs, runs):
        outcome = outcome_of(spec, finished[run.id])
        logger.info(f"trial {spec.name}: {outcome.status} on worker {outcome.worker!r}")
        outcomes.append(outcome)
    require_shared_registry(outcomes, workspace.registry.open(), str(workspace.registry.directory))
    return outcomes
