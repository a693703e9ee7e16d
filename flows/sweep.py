"""The `lr-sweep` flow: prepare data, train one model per (learning rate, seed), evaluate the
stored models by reference, compare and promote once, write the report.

The flow only orchestrates; the work is in the plain functions of `tasks/`. A trial that fails or
diverges is recorded and the others go on; the flow fails only when no trial produced a model,
and then the alias stays where it was.
"""


import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.urls import url_for

from flows.config import SweepConfig
from flows.dispatch import dispatch_trials
from flows.plan import SweepContext, trial_specs, validated
from flows.search import auto_learning_rates, run_search
from tasks.data.dataset import DatasetRef
from tasks.evaluation.compare import compare_and_promote_task
from tasks.evaluation.evaluate import evaluate_model
from tasks.reporting import progress as trial_progress
from tasks.reporting import tracking
from tasks.reporting.report import build_summary, ui_table, write_report_task
from tasks.reporting.wandb_report import save_wandb_report_task
from tasks.results import TrialOutcome, TrialSpec
from tasks.training.devices import DeviceSlots
from tasks.training.pack_plan import pack_size, plan_packs
from tasks.training.packed import train_pack_task
from tasks.training.train import failed_outcome, train_model
from tasks.workspace import Workspace

# Threads of the flow's task runner: enough for every trial to wait for a device slot; the slots,
# not the threads, decide how many trials train at once.
TASK_THREADS = 64
FINISHED_EVENT = "lr-sweep.sweep.finished"


class Timings:
    """Seconds spent in each phase of the flow, for summary.json (`make bench` reads them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


class SweepFailed(RuntimeError):
    """No trial produced a usable model."""


def collect_trials(specs: list[TrialSpec], futures: list[tuple[list[TrialSpec], PrefectFuture]]) -> list[TrialOutcome]:
    """Each trial's outcome in the order of `specs`, from futures of (its trials, a task that
    returns the outcome of one trial or the outcomes of a pack); a task that raised makes each of
    its trials a failed (or diverged) outcome."""
    outcomes = {}
    for members, future in futures:
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            get_run_logger().warning(f"trial(s) {', '.join(s.name for s in members)} did not finish: {result}")
            result = [failed_outcome(spec, result) for spec in members]
        for spec, outcome in zip(members, result if isinstance(result, list) else [result]):
            outcomes[spec.name] = outcome
    return [outcomes[spec.name] for spec in specs]


def train_grid(config: SweepConfig, specs: list[TrialSpec], dataset: DatasetRef, workspace: Workspace,
               slots: DeviceSlots) -> list[TrialOutcome]:
    """The grid's trials, packed as `pack` and the device say (tasks/training/pack_plan.py); a pack
    of one without a CUDA graph is the one-trial task the CPU always ran."""
    device_type = "cuda" if slots.devices[0].startswith("cuda") else "cpu"
    graphs = config.cuda_graphs == "auto" and device_type == "cuda"
    futures = []
    for number, members in enumerate(plan_packs(specs, pack_size(config.pack, device_type))):
        if len(members) == 1 and not graphs:
            futures.append((members, train_model.submit(members[0], dataset, workspace, slots)))
        else:
            futures.append((members, train_pack_task.submit(members, dataset, workspace, slots, f"p{number}", graphs)))
    return collect_trials(specs, futures)


def evaluate_trials(trials: list[TrialOutcome], dataset: DatasetRef, workspace: Workspace,
                    slots: DeviceSlots) -> list[TrialOutcome]:
    """Each completed trial with the evaluation of its model, fetched by reference. Evaluations
    are keyed by digest: one model is measured once, and two models are never taken for one."""
    futures = {}
    for trial in trials:
        if trial.has_model and trial.model.digest not in futures:
            futures[trial.model.digest] = evaluate_model.submit(trial, dataset, workspace, slots)
    evaluated = []
    for trial in trials:
        if not trial.has_model:
            evaluated.append(trial)
            continue
        result = futures[trial.model.digest].result(raise_on_failure=False)
        if isinstance(result, BaseException):
            evaluated.append(trial.model_copy(update={
                "status": "failed", "error": f"evaluation failed: {type(result).__name__}: {result}"}))
        else:
            evaluated.append(trial.model_copy(update={"evaluation": result}))
    return evaluated


def sweep_run_name(sweep_id: str) -> str:
    """A sweep's flow run is named after it: `lr-sweep 20261202-061737-f4122e`, not Prefect's
    `artificial-okapi`."""
    return f"lr-sweep {sweep_id}"


def name_flow_run(sweep_id: str) -> None:
    """A run started from the UI or a schedule learns its sweep id once it has started: it takes
    the name then (`lr-sweep run` names it from the start)."""
    if flow_run.name != sweep_run_name(sweep_id):
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=sweep_run_name(sweep_id))


def announce(config: SweepConfig, sweep_id: str, workspace: Workspace) -> None:
    """The sweep's start, for the live view: how many trials of how many epochs, where to look."""
    trials = (config.trials if config.search == "tpe" else 0 if config.learning_rates == "auto"
              else len(config.trial_grid()))
    wandb = (f"https://wandb.ai/{config.wandb_entity or '-'}/{config.wandb_project}" if config.wandb_mode == "online"
             else f"offline runs in {workspace.sweep_dir / 'wandb'} (`lr-sweep publish {sweep_id}` uploads them)"
             if config.wandb_mode == "offline" else None)
    trial_progress.publish(trial_progress.SweepEvent(sweep_id=sweep_id, trials=trials, epochs=config.epochs,
                                                     flow_run_url=url_for("flow-run", obj_id=flow_run.id), wandb=wandb))


def publish_artifacts(summary: dict, report_markdown: str) -> None:
    """The report (charts embedded), the trial table and the W&B report's link, attached to the flow run."""
    create_markdown_artifact(markdown=report_markdown, key="lr-sweep-report",
                             description=f"Learning-rate sweep {summary['sweep_id']}")
    create_table_artifact(table=ui_table(summary), key="lr-sweep-trials",
                          description=f"Trials of sweep {summary['sweep_id']}")
    if summary["wandb"].get("report_url"):
        create_link_artifact(summary["wandb"]["report_url"], link_text=f"W&B report of sweep {summary['sweep_id']}",
                             key="lr-sweep-wandb-report")


@flow(name="lr-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS))
def lr_sweep(config: SweepConfig = SweepConfig.model_construct()) -> dict:
    """Train one CNN per learning rate and seed, evaluate, promote the best, write the report."""
    config = validated(config)
    logger = get_run_logger()
    started = time.perf_counter()
    timings = Timings()
    context = SweepContext.from_config(config)
    name_flow_run(context.sweep_id)
    sweep_id, devices, slots, workspace, dataset = (context.sweep_id, context.devices, context.slots,
                                                    context.workspace, context.dataset)
    announce(config, sweep_id, workspace)
    if config.wandb_mode == "online":
        tracking.require_online_access(config.wandb_project, config.wandb_entity)
    if config.dispatch == "local" or config.search != "grid":  # this process starts the W&B runs
        tracking.start_service_in_background(config.wandb_mode)
    logger.info(f"sweep {sweep_id}: {config.plan_description()} on {', '.join(devices)} "
                f"({slots.per_device} at a time per device, {context.threads} CPU thread(s)); "
                f"output in {workspace.sweep_dir}")
    timings.lap("prepare_data")
    rates = auto_learning_rates(config, dataset, workspace, slots) if config.learning_rates == "auto" else None
    search = None
    if config.search != "grid":  # waves of trials, stopped at rungs
        trials, search = run_search(config, dataset, workspace, slots, rates or config.learning_rates)
    elif config.dispatch == "deployment":  # each trial a flow run on any worker of the trial pool
        trials = dispatch_trials(config, workspace, trial_specs(config, rates), dataset)
    else:
        trials = train_grid(config, trial_specs(config, rates), dataset, workspace, slots)
    timings.lap("trials")
    trials = evaluate_trials(trials, dataset, workspace, slots)
    timings.lap("evaluate")
    decision = compare_and_promote_task(trials, dataset, workspace, slots, alias=config.alias,
                                        metric=config.selection_metric, margin=config.promotion_margin)
    timings.lap("compare_and_promote")
    summary = build_summary(
        sweep_id=sweep_id, config=config.model_dump(mode="json") | {  # paths as used, whatever the cwd later
            "registry_dir": str(workspace.registry.directory), "output_dir": str(workspace.sweep_dir.parent),
            "data_dir": str(Path(config.data_dir).resolve())},
        dataset=dataset.as_metadata() | {"image_size": dataset.image_size},
        trials=trials, decision=decision, wall_seconds=time.perf_counter() - started, devices=devices,
        wandb={"mode": config.wandb_mode, "project": config.wandb_project, "entity": config.wandb_entity,
               "output_dir": str(workspace.sweep_dir.parent)},
        search=search, timings=timings.seconds,
    )
    if config.wandb_mode == "online":  # offline sweeps get theirs from `lr-sweep publish`
        summary["wandb"] |= save_wandb_report_task(summary, workspace.sweep_dir, config.wandb_project,
                                                   config.wandb_entity)
    files, report_markdown = write_report_task(summary, workspace.sweep_dir)
    publish_artifacts(summary, report_markdown)
    timings.lap("report")
    logger.info(f"report: {files['report']}")
    emit_event(event=FINISHED_EVENT, resource={"prefect.resource.id": f"lr-sweep.sweep.{sweep_id}"},
               payload={"sweep_id": sweep_id, "report": files["report"], "promoted": decision.promotion.promoted,
                        "statuses": [t.status for t in trials]})
    summary["files"] = files
    if decision.best is None:
        raise SweepFailed(f"no trial of sweep {sweep_id} produced a usable model; the alias "
                          f"'{config.alias}' was not touched. Report: {files['report']}")
    return summary

