"""The `lr-sweep` flow: prepare data, train one model per (learning rate, seed), evaluate the
stored models by reference, compare and promote once, publish the report.

The flow only orchestrates; the work is in the plain functions of `tasks/`. A trial that fails or
diverges is recorded and the others go on; the flow fails only when no trial produced a model,
and then the alias stays where it was.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import SweepConfig
from models.cnn import ARCHITECTURE_NAME
from tasks import tracking
from tasks.compare import compare_and_promote_task
from tasks.context import SweepContext
from tasks.data import prepare_data
from tasks.devices import configure_cpu_threads, resolve_devices, slots_per_device
from tasks.evaluate import evaluate_model
from tasks.report import build_summary, publish_report
from tasks.train import TrialDiverged, TrialOutcome, TrialSpec, train_model

# Threads of the flow's task runner: enough for every trial to wait for a device slot; the slots,
# not the threads, decide how many trials train at once.
TASK_THREADS = 64


class SweepFailed(RuntimeError):
    """No trial produced a usable model."""


def new_sweep_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def collection_name(dataset: str) -> str:
    """One registry collection per dataset and architecture, as in W&B's model registry."""
    return f"{dataset}-{ARCHITECTURE_NAME}"


def trial_specs(config: SweepConfig) -> list[TrialSpec]:
    return [TrialSpec(learning_rate=rate, seed=seed, epochs=config.epochs, batch_size=config.batch_size,
                      hidden_units=config.hidden_units, optimizer=config.optimizer)
            for rate, seed in config.trial_grid()]


def sweep_context(config: SweepConfig, sweep_id: str, devices: list[str]) -> SweepContext:
    """The context of a sweep (or of one trial of it), with its output directory made and W&B's
    folders pointed into the output directory, ready for tasks to write."""
    output = Path(config.output_dir).resolve()
    context = SweepContext(
        sweep_id=sweep_id, sweep_dir=output / sweep_id, checkpoint_root=output / "checkpoints",
        collection=collection_name(config.dataset), wandb_mode=config.wandb_mode,
        wandb_project=config.wandb_project, wandb_entity=config.wandb_entity,
        wandb_registry_collection=config.wandb_registry_collection,
        registry_backend=config.registry, registry_dir=Path(config.registry_dir).resolve(),
        devices=tuple(devices), trials_per_device=slots_per_device(devices, config.trials_per_device),
    )
    context.sweep_dir.mkdir(parents=True, exist_ok=True)
    tracking.point_wandb_dirs(output)
    return context


def failed_outcome(spec: TrialSpec, error: BaseException) -> dict:
    diverged = isinstance(error, TrialDiverged)
    return TrialOutcome(
        learning_rate=spec.learning_rate, seed=spec.seed, status="diverged" if diverged else "failed",
        error=f"{type(error).__name__}: {error}", history=getattr(error, "history", []),
    ).as_dict()


@flow(name="lr-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS))
def lr_sweep(config: SweepConfig = SweepConfig()) -> dict:
    """Train one CNN per learning rate and seed, evaluate, promote the best, write the report."""
    logger = get_run_logger()
    started = time.perf_counter()
    sweep_id = config.sweep_id or new_sweep_id()
    devices = resolve_devices(config.device)
    threads = configure_cpu_threads(devices)
    context = sweep_context(config, sweep_id, devices)
    if config.wandb_mode == "online":
        tracking.require_online_access(config.wandb_project, config.wandb_entity)
    logger.info(f"sweep {sweep_id}: {len(config.trial_grid())} trial(s) on {', '.join(devices)} "
                f"({context.trials_per_device} at a time per device, {threads} CPU thread(s)); "
                f"output in {context.sweep_dir}")

    dataset = prepare_data(config.dataset, config.data_dir, config.val_size, config.split_seed,
                           config.train_limit)
    specs = trial_specs(config)
    if config.dispatch == "deployment":  # each trial a flow run on any worker of the trial pool
        from flows.dispatch import dispatch_trials  # here: flows.dispatch imports this module

        futures, trials = [], dispatch_trials(config, sweep_id, context, specs, dataset)
    else:
        futures, trials = [train_model.submit(spec, dataset, context) for spec in specs], []
    for spec, future in zip(specs, futures):
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            logger.warning(f"trial {spec.name} did not finish: {result}")
            trials.append(failed_outcome(spec, result))
        else:
            trials.append(result)

    evaluations = {t["model"]: evaluate_model.submit(t["model"], dataset, context)
                   for t in trials if t["status"] == "completed"}
    for trial in trials:
        if trial["model"] in evaluations:
            result = evaluations[trial["model"]].result(raise_on_failure=False)
            if isinstance(result, BaseException):
                trial.update(status="failed", error=f"evaluation failed: {type(result).__name__}: {result}")
            else:
                trial["evaluation"] = result

    decision = compare_and_promote_task(trials, dataset, context, alias=config.alias,
                                        metric=config.selection_metric, margin=config.promotion_margin)
    summary = build_summary(
        sweep_id=sweep_id, config=config.model_dump(mode="json"),
        dataset={"name": dataset.name, "fingerprint": dataset.fingerprint, "train_size": dataset.train_size,
                 "val_size": dataset.val_size, "test_size": dataset.test_size},
        trials=trials, decision=decision, wall_seconds=time.perf_counter() - started, devices=devices,
    )
    files = publish_report(summary, context.sweep_dir)
    summary["files"] = files
    if decision["best"] is None:
        raise SweepFailed(f"no trial of sweep {sweep_id} produced a usable model; the alias "
                          f"'{config.alias}' was not touched. Report: {files['report']}")
    return summary
