"""Per-trial dispatch, the sweep's side: each trial as a flow run of the per-trial deployment.

With `dispatch="deployment"` the sweep submits each (learning rate, seed) trial as a flow run of
the trial deployment (a deployment of flows/trial.py's `lr-sweep-trial`: `trial_deployment`,
or the one on the sweep's own work pool) with `run_deployment`,
so every worker that polls that deployment's work pool, on every node, takes trials. The sweep
waits for the runs until `dispatch_timeout_minutes` (re-running what a machine lost, riding out a
server outage: flows/trial_runs.py), reads each outcome back as JSON and goes on to evaluate and
compare as a local sweep does.

Trust: outcomes are read as plain JSON from the result file the trial wrote (its declared
serializer must be JSON; no Prefect deserializer, so nothing written to the shared result folder
can make the sweep unpickle or import anything), and only from under the configured result
storage (a state naming another path or block is refused). An outcome is accepted only for the
trial that was submitted: its learning rate and seed, and a model whose metadata says it was
trained with the submitted spec. Models are then fetched by reference and
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
from prefect.settings import PREFECT_API_URL, get_current_settings

from flows.config import SweepConfig
from flows.plan import TRIAL_FLOW_NAME
from flows.trial import release_slot_of
from flows.trial_runs import HEARTBEAT_SECONDS, TrialRuns, TrialRunWatcher
from models.registry import ModelRegistry
from tasks.data.dataset import DatasetRef
from tasks.results import TrialOutcome, TrialSpec
from tasks.training.train import failed_outcome
from tasks.workspace import Workspace

# The setting that makes a flow run send heartbeats, in seconds (Prefect's flow engine reads it).
HEARTBEAT_VARIABLE = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


class TrialRunFailed(RuntimeError):
    """A trial's flow run ended without an acceptable outcome (crashed, cancelled, late, result
    unreadable, or an outcome of another trial)."""


class OutcomeRefused(TrialRunFailed):
    """A trial run's state names a result outside the result storage, or another trial's outcome."""


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


def submit_trial(config: SweepConfig, deployment: str, workspace: Workspace, spec: TrialSpec,
                 dataset: DatasetRef, attempt: int = 1) -> FlowRun:
    """One flow run of the trial deployment for `spec`; attempts after the first are named so.

    The run sends Prefect heartbeats (its environment says how often): a run that stops sending
    them while Running is taken for lost (flows/trial_runs.py)."""
    suffix = "" if attempt == 1 else f"-attempt{attempt}"
    try:
        return run_deployment(
            deployment, timeout=0, flow_run_name=f"{workspace.sweep_id}-{spec.name}{suffix}",
            parameters=trial_parameters(config, workspace, spec, dataset),
            job_variables={"env": {HEARTBEAT_VARIABLE: str(HEARTBEAT_SECONDS)}},
            tags=[f"sweep:{workspace.sweep_id}"])
    except ObjectNotFound:
        raise ValueError(
            f"trial_deployment {deployment!r} does not exist on the Prefect "
            f"server at {PREFECT_API_URL.value()}: deploy it from prefect.yaml first "
            f"(`prefect --no-prompt deploy --name {deployment}`)") from None


def queue_of(deployment_name: str) -> str:
    """'pool POOL, queue QUEUE' of a deployment, for messages about runs nobody took."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
    return f"work pool {deployment.work_pool_name!r}, queue {deployment.work_queue_name!r}"


def result_path(metadata) -> Path:
    """The local result file a trial run's state names, if it lies under this process's result
    storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH, shared by the sweep and its trials); anywhere
    else, the state is not trusted: nothing else may be read on the say-so of a run's state."""
    root = Path(get_current_settings().results.local_storage_path).expanduser().resolve()
    path = Path(metadata.storage_key)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root):
        raise OutcomeRefused(f"its result is stored at {path}, outside the result storage {root}; "
                             "it is not read")
    return path


def remote_result(metadata) -> bytes:
    """A result in remote storage (e.g. S3), read only from the configured default result
    storage block (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK), not from any block a state names."""
    configured = get_current_settings().results.default_storage_block
    with get_client(sync_client=True) as client:
        document = client.read_block_document(metadata.storage_block_id)
    named = f"{document.block_type.slug}/{document.name}"
    if named != configured:
        raise OutcomeRefused(f"its result is stored in block {named!r}, not in the configured result "
                             f"storage {configured!r}; it is not read")
    return Block._from_block_document(document).read_path(metadata.storage_key)


def read_outcome_json(flow_run: FlowRun) -> dict:
    """The trial's result as plain JSON, read from its result file without Prefect's deserializer
    (which would honour whatever serializer the record names)."""
    metadata = flow_run.state.data
    serializer = getattr(getattr(metadata, "serializer", None), "type", None)
    if serializer != "json":
        raise TrialRunFailed(f"flow run {flow_run.name}: its result is stored with serializer "
                             f"{serializer!r}, not JSON; it is not read")
    if metadata.storage_block_id is None:
        data = result_path(metadata).read_bytes()
    else:
        data = remote_result(metadata)
    return json.loads(data)


def submitted_outcome(spec: TrialSpec, data: dict) -> TrialOutcome:
    """The outcome a trial run handed back, if it is the outcome of the trial that was submitted."""
    outcome = TrialOutcome.model_validate(data)
    if (outcome.learning_rate, outcome.seed) != (spec.learning_rate, spec.seed):
        raise OutcomeRefused(f"it names learning rate {outcome.learning_rate:g}, seed {outcome.seed}, not "
                             f"the submitted {spec.learning_rate:g}, seed {spec.seed}; it is not accepted")
    return outcome


def outcome_of(spec: TrialSpec, flow_run: FlowRun | TrialRunFailed) -> TrialOutcome:
    """The outcome the trial handed back, or a failed outcome saying why there is none."""
    if isinstance(flow_run, TrialRunFailed):
        return failed_outcome(spec, flow_run)
    state = flow_run.state
    if state.is_completed() or (state.is_failed() and state.data is not None):
        try:
            return submitted_outcome(spec, read_outcome_json(flow_run))
        except OutcomeRefused as error:
            reason = f"flow run {flow_run.name} ended but its outcome was refused: {error}"
        except Exception as error:  # unreadable, not shared between the nodes, not an outcome
            reason = (f"flow run {flow_run.name} completed but its outcome could not be read "
                      f"({type(error).__name__}: {error}): result storage must be shared by the "
                      "sweep and its trials")
    else:
        reason = f"flow run {flow_run.name} ended {state.type.value}: {state.message}"
    return failed_outcome(spec, TrialRunFailed(reason)).model_copy(update={"flow_run": str(flow_run.id)})


def outcome_of_trial(trial: TrialRuns, queue: str) -> TrialOutcome:
    """The trial's outcome from its last run, with every attempt it took."""
    if trial.timed_out:
        ended = TrialRunFailed(f"flow run {trial.current.name} {trial.timed_out}; start a worker on "
                               f"{queue} or raise dispatch_timeout_minutes")
        outcome = outcome_of(trial.spec, ended).model_copy(update={"flow_run": str(trial.current.id)})
    elif trial.gave_up:
        ended = TrialRunFailed(f"flow run {trial.final.name} {trial.gave_up}; no retries left "
                               f"({len(trial.runs)} attempt(s), trial_retries {len(trial.runs) - 1})")
        outcome = outcome_of(trial.spec, ended).model_copy(update={"flow_run": str(trial.final.id)})
    else:
        outcome = outcome_of(trial.spec, trial.final)
    return outcome.model_copy(update={"attempts": trial.attempt_records()})


def require_shared_registry(trials: list[TrialOutcome], registry: ModelRegistry, where: str,
                            specs: list[TrialSpec] | None = None) -> None:
    """Every completed trial's model must be in the sweep's registry with the trial's digest, and
    (given the specs submitted) be a model trained with that trial's spec."""
    for index, trial in enumerate(trials):
        if not trial.has_model:
            continue
        found = registry.resolve(trial.model.collection, trial.model.version)
        if found is None or found.digest != trial.model.digest:
            holder = "nothing" if found is None else f"another model (digest {found.digest[:12]}…)"
            raise RegistryNotShared(
                f"trial {trial.name} stored {trial.model.short} on worker {trial.worker!r}, but the "
                f"sweep's registry {where} holds {holder} under that name: the registry is not "
                "shared between the nodes. Put registry_dir on storage every node mounts at the "
                "same path, or use registry='wandb'. Nothing was promoted.")
        if specs is not None:
            require_trained_as(specs[index], trial, registry)


def require_trained_as(spec: TrialSpec, trial: TrialOutcome, registry: ModelRegistry) -> None:
    """The model a dispatched trial names was trained with the submitted spec (its metadata says
    so): another model of the registry cannot stand in for it."""
    infos = [info for info in registry.versions(trial.model.collection) if info.ref == trial.model]
    training = infos[0].metadata.get("training") if infos else None
    if training != spec.record():
        raise OutcomeRefused(f"trial {spec.name} handed back {trial.model.short}, a model trained with "
                             f"{training}, not with the submitted {spec.record()}: refused, nothing "
                             "was promoted")


def release_run_slot(run: FlowRun) -> None:
    """A dead run's device slot, back to its worker's other trials (flows/trial.py records it)."""
    if (released := release_slot_of(run.id)) is not None:
        get_run_logger().info(f"released the device slot {released} held by flow run {run.name}")


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
    queue = queue_of(deployment)

    def submit(spec: TrialSpec, attempt: int = 1) -> FlowRun:
        return submit_trial(config, deployment, workspace, spec, dataset, attempt)

    trials = [TrialRuns(spec, [submit(spec)]) for spec in specs]
    logger.info(f"dispatched {len(trials)} trial(s) to deployment {deployment!r}; waiting for the "
                f"workers of its pool: {', '.join(trial.current.name for trial in trials)}")
    deadline = time.monotonic() + 60 * config.dispatch_timeout_minutes
    with get_client(sync_client=True) as client:
        TrialRunWatcher(client, trials, config.trial_retries, deadline, resubmit=submit,
                        release=release_run_slot, log=logger.info, warn=logger.warning).wait()
    outcomes = []
    for trial in trials:
        outcome = outcome_of_trial(trial, queue)
        tries = f" after {len(outcome.attempts)} attempts" if len(outcome.attempts) > 1 else ""
        logger.info(f"trial {trial.spec.name}: {outcome.status}{tries} on worker {outcome.worker!r}")
        outcomes.append(outcome)
    require_shared_registry(outcomes, workspace.registry.open(), str(workspace.registry.directory), specs)
    return outcomes
