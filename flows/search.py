"""Searches beyond the grid, orchestrated: the LR range test before a sweep (`learning_rates:
auto`), successive halving (`search: asha`) and TPE (`search: tpe`) as waves of Prefect tasks.

The decisions are plain functions, one module per algorithm (tasks/search/range_test.py,
tasks/search/halving.py, tasks/search/tpe.py); this module gives them a `train_to` that
trains a rung's trials in parallel, one Prefect task each, on the sweep's device slots: a rung
below the last trains to that epoch and checkpoints (`train_until`), the last rung is the
ordinary trial (`train_model`: it resumes from that checkpoint with the weights of an
uninterrupted run, stores the model and logs its W&B run). Stopped trials get a W&B run and a
`stopped` outcome and are never stored, so never promoted.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.config import SweepConfig
from flows.plan import SweepContext, validated
from tasks.data.dataset import DatasetRef
from tasks.evaluation.ranking import higher_is_better
from tasks.results import TrialOutcome, TrialSpec
from tasks.search.config import masked_url
from tasks.search.halving import epoch_accounting, rung_epochs, successive_halving
from tasks.search.range_test import RangeTestResult, auto_grid, find_learning_rate
from tasks.search.tpe import default_storage_url, open_study, startup_trials, study_name, tpe_search
from tasks.training.devices import DeviceSlots
from tasks.training.train import failed_outcome, record_stopped_task, train_model, train_until_task
from tasks.workspace import Workspace


@task(name="find_learning_rate", task_run_name="LR range test {min_lr:g}..{max_lr:g}", cache_policy=NO_CACHE)
def find_learning_rate_task(spec: TrialSpec, dataset, workspace, slots, min_lr: float, max_lr: float) -> RangeTestResult:
    result, chart = find_learning_rate(spec, dataset, workspace, slots, min_lr=min_lr, max_lr=max_lr)
    image = base64.b64encode(chart.read_bytes()).decode()
    create_markdown_artifact(
        key="lr-find", description=f"LR range test of sweep {workspace.sweep_id}",
        markdown=f"# LR range test\n\nSuggested learning rate **{result.suggestion:.3g}** (steepest descent of "
                 f"the smoothed loss, {len(result.lrs)} steps from {min_lr:g} to {max_lr:g}"
                 f"{', stopped on blow-up' if result.stopped_early else ''}).\n\n"
                 f"![lr_find](data:image/png;base64,{image})\n")
    get_run_logger().info(f"LR range test: suggestion {result.suggestion:.3g} ({chart})")
    return result


def auto_learning_rates(config: SweepConfig, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots) -> list[float]:
    """`learning_rates: auto`: the range test's suggestion times each of `auto_factors`."""
    result = find_learning_rate_task(TrialSpec.shared(config), dataset, workspace, slots, config.min_lr, config.max_lr)
    rates = auto_grid(result.suggestion, config.auto_factors)
    get_run_logger().info(f"learning rates from the range test: {', '.join(f'{r:g}' for r in rates)}")
    return rates


class RungTrainer:
    """`train_to(rates, epoch)` for the search drivers: one Prefect task per trial of the rung."""

    def __init__(self, base: TrialSpec, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots):
        self.base, self.dataset, self.workspace, self.slots = base, dataset, workspace, slots
        self.finished: dict[float, TrialOutcome] = {}  # trials that reached the last epoch
        self.failed: dict[float, TrialOutcome] = {}
        self.histories: dict[float, list[dict]] = {}  # each trial's epochs so far

    def spec(self, rate: float) -> TrialSpec:
        return self.base.but(learning_rate=float(rate))

    def __call__(self, rates, epoch: int) -> dict[float, list[dict]]:
        last = epoch >= self.base.training.epochs
        futures = {rate: (train_model if last else train_until_task).submit(
            self.spec(rate), self.dataset, self.workspace, self.slots, *(() if last else (epoch,)))
            for rate in rates}
        answered = {}
        for rate, future in futures.items():
            result = future.result(raise_on_failure=False)
            if isinstance(result, BaseException):  # diverged or failed: out of the search
                self.failed[rate] = failed_outcome(self.spec(rate), result)
                continue
            if isinstance(result, TrialOutcome):
                self.finished[rate] = result
                result = result.history
            self.histories[rate] = answered[rate] = result
        return answered

    def stopped(self, stopped_at: dict[float, int]) -> list[TrialOutcome]:
        futures = [record_stopped_task.submit(self.spec(rate), self.dataset, self.workspace,
                                              self.histories.get(rate, [])[:rung], rung)
                   for rate, rung in stopped_at.items()]
        return [future.result() for future in futures]


def study_identity(config: SweepConfig, dataset: DatasetRef, base: TrialSpec, rungs: list[int]) -> dict:
    """What names a TPE study: everything that changes a trial's result (the data and its split:
    val_size, split_seed, train_limit; the trial's spec) and the search's settings, so two
    searches share a study only when their trials are interchangeable."""
    return {"dataset": dataset.as_metadata(), "spec": base.model_dump(exclude={"learning_rate"}),
            "lr_range": config.lr_range, "rungs": rungs, "eta": config.reduction_factor,
            "metric": config.selection_metric}


@dataclass
class SearchRun:
    """What one search did: where it stopped which rate, the epochs each trial trained (by any
    key), how many trials the grid would have trained, and its own figures for summary.json."""

    stopped_at: dict[float, int]
    epochs: dict
    grid_trials: int
    extra: dict = field(default_factory=dict)


def run_halving(config: SweepConfig, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots,
                trainer: RungTrainer, rungs: list[int], rates: list[float]) -> SearchRun:
    """Successive halving of the given rates (tasks/search/halving.py)."""
    result = successive_halving(rates, rungs, config.reduction_factor, trainer, config.selection_metric,
                                log=get_run_logger().info)
    return SearchRun(result.stopped_at, result.epochs_trained, len(rates), {"title": "successive halving"})


def run_tpe(config: SweepConfig, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots,
            trainer: RungTrainer, rungs: list[int], rates: list[float] | None) -> SearchRun:
    """Optuna's TPE over lr_range, stopped at the rungs (tasks/search/tpe.py); its study is resumed
    by the same command."""
    metric = config.selection_metric
    storage = config.optuna_storage or default_storage_url(workspace.sweep_dir.parent)
    name = study_name(study_identity(config, dataset, trainer.base, rungs))
    startup = startup_trials(config.trials)
    study = open_study(storage, name, seed=config.seeds[0], n_startup_trials=startup,
                       direction="maximize" if higher_is_better(metric) else "minimize")
    parallel = len(slots.devices) * slots.per_device
    result = tpe_search(study, config.trials, parallel, tuple(config.lr_range), rungs, trainer, metric,
                        reduction_factor=config.reduction_factor, log=get_run_logger().info)
    # Trials finished by an earlier, killed run of this search: stored, so reused, not retrained.
    for trial in result.trials:
        if trial.state == "complete" and trial.learning_rate not in trainer.finished:
            trainer([trial.learning_rate], config.epochs)
    return SearchRun(
        stopped_at={t.learning_rate: t.stopped_at for t in result.trials if t.state == "pruned"},
        epochs={t.number: t.epochs_trained for t in result.trials}, grid_trials=len(result.trials),
        extra={"title": "TPE (Optuna)", "study": name, "storage": masked_url(storage),
               "trials_now": len(result.trained_now), "recovered": result.recovered, "n_startup_trials": startup})


# The searches that stop trials at rungs, by `search` (grid trains every trial to the end and is
# the sweep's own path). A new search: its run function here and its line, its fields in
# tasks/search/config.py, its name in SearchConfig.search.
SEARCHES = {"asha": run_halving, "tpe": run_tpe}


def run_search(config: SweepConfig, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots,
               rates: list[float] | None) -> tuple[list[TrialOutcome], dict]:
    """The trials of a search that stops trials at rungs (outcomes in learning-rate order) and
    what the search did, for summary.json."""
    rungs = rung_epochs(config.epochs, config.grace_epochs, config.reduction_factor)
    trainer = RungTrainer(TrialSpec.shared(config), dataset, workspace, slots)
    run = SEARCHES[config.search](config, dataset, workspace, slots, trainer, rungs, rates)
    outcomes = [*trainer.finished.values(), *trainer.failed.values(), *trainer.stopped(run.stopped_at)]
    outcomes.sort(key=lambda t: t.learning_rate)
    summary = {"method": config.search, "rungs": rungs, "reduction_factor": config.reduction_factor,
               "stopped_at": {f"{rate:g}": rung for rate, rung in sorted(run.stopped_at.items())},
               **epoch_accounting(run.epochs, run.grid_trials, config.epochs), **run.extra}
    get_run_logger().info(f"search {config.search}: {summary['epochs_trained']} epochs trained, "
                          f"{summary['fraction_of_grid']:.0%} of the {summary['grid_epochs']} the grid would train")
    return outcomes, summary


@flow(name="lr-sweep-find", log_prints=True)
def lr_sweep_find(config: SweepConfig = SweepConfig.model_construct()) -> dict:
    """The LR range test alone (`lr-sweep find`): its suggestion, the grid `auto` would sweep,
    lr_find.png, a W&B run and a Prefect artifact."""
    config = validated(config)
    context = SweepContext.from_config(config, per_device=1)
    workspace = context.workspace
    result = find_learning_rate_task(TrialSpec.shared(context.config), context.dataset, workspace, context.slots,
                                     config.min_lr, config.max_lr)
    return {"suggestion": result.suggestion, "grid": auto_grid(result.suggestion, config.auto_factors),
            "chart": str(workspace.sweep_dir / "lr_find.png"), "stopped_early": result.stopped_early,
            "steps": len(result.lrs)}
