"""A pack of trials end to end: trials that differ only in learning rate, seed, warmup or weight
decay train in ONE engine call (tasks/training/packing.py), and each member is still a trial of
its own: its lock and checkpoint (the file an unpacked trial writes), the reuse of its finished
model, its W&B run and per-epoch logs, its divergence (it stops, the others go on), its stored
model and its outcome. A member whose model is already stored leaves the pack before training.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import nn

from tasks.data.prepare import DatasetRef, Splits, eval_batches, load_splits
from tasks.evaluation.evaluate import eval_batch_size
from tasks.reporting import tracking
from tasks.results import TrialOutcome, TrialSpec
from tasks.training.checkpoints import load_checkpoint, save_checkpoint
from tasks.training.devices import DeviceSlots, trial_stream
from tasks.training.identity import checkpoint_folder, input_shape, trial_key
from tasks.training.packing import (
    MemberResult,
    MemberStart,
    PackedTrainer,
    Unpackable,
    engine_name,
    measure_pack,
    steps_per_epoch,
)
from tasks.training.schedules import schedule_of
from tasks.training.train import (
    TrainResult,
    TrialDiverged,
    engine_record,
    epoch_reporter,
    failed_outcome,
    init_model,
    make_optimizer,
    no_progress,
    notify_ended,
    progress_reporter,
    publish_wandb_link,
    reuse_finished,
    reused_status,
    run_config,
    store_trained,
    train_trial,
    trial_lock,
)
from tasks.workspace import Workspace


@dataclass
class PackRun:
    """What one call of `train_pack` did: a result per member, in the order of its specs."""

    results: list[MemberResult]
    engine: str
    reason: str | None = None  # why it is not packed, or runs without a CUDA graph


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {name: dict(optimizer.state.get(param, {})) for name, param in model.named_parameters()}


def set_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, dict]) -> None:
    """A member's optimizer state, as the packed engine keeps it, into a torch.optim optimizer of
    its model: its checkpoint then is the one an unpacked trial writes (and reads)."""
    for name, param in model.named_parameters():
        state = {}
        for key, value in named[name].items():
            # the fused optimizers keep `step` as a float32 tensor on the parameter's device
            state[key] = (value.to(device=param.device, dtype=torch.float32) if key == "step"
                          else torch.empty_like(param).copy_(value))
        optimizer.state[param] = state


def train_one_by_one(specs: list[TrialSpec], splits: Splits, device, checkpoint_dirs: list[Path | None],
                     on_epoch: Callable[[int, dict], None], stop_at: int | None) -> list[MemberResult]:
    """The members of a pack that cannot be packed, each trained alone by `train_trial`."""
    results = []
    for index, spec in enumerate(specs):
        try:
            result = train_trial(spec, splits, device, checkpoint_dirs[index],
                                 lambda record, index=index: on_epoch(index, record), stop_at=stop_at)
        except TrialDiverged as error:
            results.append(MemberResult(history=error.history, error=str(error)))
            continue
        results.append(MemberResult(history=result.history, state_dict=result.state_dict,
                                    resumed_from=result.resumed_from, train_seconds=result.train_seconds,
                                    samples_per_second=result.samples_per_second))
    return results


def member_schedules(specs: list[TrialSpec], splits: Splits) -> list:
    steps = steps_per_epoch(splits.train_size, specs[0].training.batch_size)
    return [schedule_of(spec.training, spec.learning_rate, steps) for spec in specs]


def train_pack(specs: list[TrialSpec], splits: Splits, device: str | torch.device,
               checkpoint_dirs: list[Path | None] | None = None,
               on_epoch: Callable[[int, dict], None] | None = None, stop_at: int | None = None,
               graphs: bool = False, say: Callable[[str], None] = print) -> PackRun:
    """Train the members of one pack (specs equal but for rate, seed, warmup and weight decay)
    in one engine call, each from its own checkpoint if it has one; one by one, as `train_trial`
    trains them, when the model cannot be packed. A diverged member comes back with its error
    and no weights; the others are unaffected."""
    device = torch.device(device)
    dirs = checkpoint_dirs or [None] * len(specs)
    report = on_epoch or (lambda index, record: None)
    if len(specs) == 1 and not graphs:  # a pack of one without a graph is a trial as it always trained
        return PackRun(train_one_by_one(specs, splits, device, dirs, report, stop_at), engine_name(False, False))
    last_epoch = specs[0].training.epochs if stop_at is None else min(stop_at, specs[0].training.epochs)
    models = [init_model(spec, device, input_shape(splits.dataset)) for spec in specs]
    optimizers = [make_optimizer(spec.training.optimizer, model.parameters(), spec.learning_rate,
                                 weight_decay=spec.training.weight_decay) for spec, model in zip(specs, models)]
    starts = []
    for spec, model, optimizer, directory in zip(specs, models, optimizers, dirs):
        header = None if directory is None else load_checkpoint(directory, spec, model, optimizer, last_epoch)
        starts.append(MemberStart() if header is None else
                      MemberStart(epoch=header["epoch"], history=header["history"], train_seconds=header["train_seconds"]))
    try:
        pack = PackedTrainer(models, specs, splits.train_x, splits.train_y, member_schedules(specs, splits),
                             graphs=graphs and device.type == "cuda", say=say)
    except Unpackable as reason:
        say(f"trials {', '.join(s.name for s in specs)} train one by one: {reason}")
        return PackRun(train_one_by_one(specs, splits, device, dirs, report, stop_at), engine_name(False, False), str(reason))
    except torch.cuda.OutOfMemoryError:  # the probe step of `pack` auto: this many do not fit
        if len(specs) == 1:
            raise
        del models, optimizers
        torch.cuda.empty_cache()
        half = len(specs) // 2
        say(f"a pack of {len(specs)} does not fit on {device}: it trains as packs of {half} and {len(specs) - half}")
        first = train_pack(specs[:half], splits, device, dirs[:half], report, stop_at, graphs, say)
        second = train_pack(specs[half:], splits, device, dirs[half:], lambda index, record: report(index + half, record),
                            stop_at, graphs, say)
        return PackRun(first.results + second.results, first.engine, first.reason or second.reason)
    for index, start in enumerate(starts):
        if start.epoch:
            pack.load_member(index, models[index].state_dict(), named_optimizer_state(models[index], optimizers[index]))
        for record in start.history:  # the restored epochs are reported too (a W&B run starts at epoch 1)
            report(index, record)
    histories = [list(start.history) for start in starts]
    started = time.perf_counter()

    def epoch_done(index: int, record: dict) -> None:
        histories[index].append(record)
        if dirs[index] is not None:
            model, optimizer = models[index], optimizers[index]
            model.load_state_dict(pack.member_state_dict(index))
            set_optimizer_state(model, optimizer, pack.optimizer_state(index))
            for group in optimizer.param_groups:
                group["lr"] = record["lr"]
            save_checkpoint(dirs[index], specs[index], record["epoch"], model, optimizer, histories[index],
                            starts[index].train_seconds + time.perf_counter() - started)
        report(index, record)

    # every member's forward on one batch: the evaluation batch is shared out among them
    batch = max(64, eval_batch_size(splits.device) // len(specs))
    results = pack.train(starts, stop_at, epoch_done,
                         lambda forward: measure_pack(forward, eval_batches(splits, "val", batch)))
    return PackRun(results, pack.engine, pack.graph_error)


# --- the pack as trials ---------------------------------------------------------------------------

@contextlib.contextmanager
def trial_locks(specs: list[TrialSpec], dataset: DatasetRef, workspace: Workspace) -> Iterator[list[Path]]:
    """Every member's checkpoint folder, held for the block. Taken in one order (by folder name),
    so two sweeps that pack the same trials differently never wait for each other in a circle."""
    with contextlib.ExitStack() as stack:
        folders = {}
        for spec in sorted(specs, key=lambda spec: checkpoint_folder(spec, dataset)):
            folders[spec.name] = stack.enter_context(trial_lock(spec, dataset, workspace))
        yield [folders[spec.name] for spec in specs]


class MemberRuns:
    """The W&B runs of a pack's members, each finished once: when its member ends (stored,
    diverged), or, still open when the pack raises, failed with the error (as tracking.trial_run
    finishes a trial's run)."""

    def __init__(self, workspace: Workspace, specs: list[TrialSpec], configs: list[dict]):
        self.workspace, self.specs, self.configs = workspace, specs, configs
        self.runs: list = []
        self.open: set[int] = set()

    def __enter__(self) -> list:
        try:
            for index, (spec, config) in enumerate(zip(self.specs, self.configs)):
                self.runs.append(tracking.start_run(self.workspace.tracking, group=self.workspace.sweep_id,
                                                    name=spec.name, config=config, run_dir=self.workspace.sweep_dir))
                self.open.add(index)
        except BaseException as error:
            self.__exit__(type(error), error, None)
            raise
        return self.runs

    def finish(self, index: int, status: str | None = None, error: str | None = None) -> None:
        run = self.runs[index]
        if status is not None:
            run.summary.update({"status": status, "error": error})
        run.finish(exit_code=1 if error else 0)
        self.open.discard(index)

    def __exit__(self, kind, error, trace) -> None:
        for index in sorted(self.open):
            if error is not None:
                self.finish(index, "failed", str(error))
            else:
                self.finish(index)


def diverged_outcome(spec: TrialSpec, result: MemberResult, engine: dict, run) -> TrialOutcome:
    """As `failed_outcome` reports a trial alone that raised TrialDiverged."""
    return TrialOutcome(learning_rate=spec.learning_rate, seed=spec.seed, status="diverged",
                        error=f"{TrialDiverged.__name__}: {result.error}", history=result.history,
                        wandb_run_dir=tracking.run_directory(run), **engine)


def train_and_store_pack(specs: list[TrialSpec], dataset: DatasetRef, workspace: Workspace, keys: list[str],
                         folders: list[Path], device: str, pack_id: str, graphs: bool, log: Callable[[str], None],
                         progress: list[Callable[..., None]]) -> list[TrialOutcome]:
    """Train (or resume) the members on `device` in one engine call; store each member's model and
    record it in its W&B run. A diverged member's outcome says so (as data)."""
    splits = load_splits(dataset, device)
    configs = [run_config(spec, dataset, device, key) for spec, key in zip(specs, keys)]
    member_runs = MemberRuns(workspace, specs, configs)
    with member_runs as runs:
        reporters = [epoch_reporter(spec, dataset, run, device, log, member_progress)
                     for spec, run, member_progress in zip(specs, runs, progress)]
        started = time.perf_counter()
        with trial_stream(device):
            packed = train_pack(specs, splits, device, folders, lambda index, record: reporters[index](record),
                                graphs=graphs, say=log)
        log(f"pack {pack_id} ({len(specs)} trials, {packed.engine}) trained in {time.perf_counter() - started:.1f} s"
            + (f"; {packed.reason}" if packed.reason else ""))
        engine = engine_record(packed.engine, {"id": pack_id, "size": len(specs)}, packed.reason)
        outcomes = []
        for index, (spec, key, result) in enumerate(zip(specs, keys, packed.results)):
            if result.error is not None:
                member_runs.finish(index, "diverged", result.error)
                outcomes.append(diverged_outcome(spec, result, engine, runs[index]))
                continue
            trained = TrainResult(state_dict=result.state_dict, history=result.history, train_seconds=result.train_seconds,
                                  samples_per_second=result.samples_per_second, resumed_from=result.resumed_from)
            outcomes.append(store_trained(spec, dataset, workspace, key, runs[index], device, trained, engine, log))
    return outcomes


def run_pack(specs: list[TrialSpec], dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots, pack_id: str,
             graphs: bool, log: Callable[[str], None] = print,
             progress: list[Callable[..., None]] | None = None) -> list[TrialOutcome]:
    """Reuse, resume or train the trials of one pack: an outcome per spec, in order (a diverged
    member's says so). The members' locks are held throughout, as `run_trial` holds its trial's."""
    progress = progress or [no_progress] * len(specs)
    keys = [trial_key(spec, dataset) for spec in specs]
    outcomes: dict[int, TrialOutcome] = {}
    with trial_locks(specs, dataset, workspace) as folders:
        registry = workspace.registry.open()
        for index, (spec, key) in enumerate(zip(specs, keys)):
            if (reused := reuse_finished(spec, registry, workspace.collection, key)) is not None:
                log(f"[{spec.name}] reusing {reused.model.short}: this trial already finished with the "
                    "same config, data and code")
                progress[index](100, reused_status(reused), state="reused", model=reused.model.short)
                outcomes[index] = reused
        members = [index for index in range(len(specs)) if index not in outcomes]
        if members:
            for index in members:
                progress[index](0, "waiting for a device slot")
            with slots.take() as device:
                trained = train_and_store_pack([specs[i] for i in members], dataset, workspace, [keys[i] for i in members],
                                               [folders[i] for i in members], device, pack_id, graphs, log,
                                               [progress[i] for i in members])
            for index, outcome in zip(members, trained):
                outcomes[index] = outcome
                if outcome.status == "completed":
                    shutil.rmtree(folders[index], ignore_errors=True)  # the model is stored: done with it
                    progress[index](100, f"stored {outcome.model.short}")
    return [outcomes[index] for index in range(len(specs))]


@task(name="train_pack", task_run_name="train pack {pack_id}", cache_policy=NO_CACHE)
def train_pack_task(specs: list[TrialSpec], dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots,
                    pack_id: str, graphs: bool) -> list[TrialOutcome]:
    """The trials of one pack in one engine call; each keeps its progress artifact and W&B link."""
    try:
        outcomes = run_pack(specs, dataset, workspace, slots, pack_id, graphs, log=get_run_logger().info,
                            progress=[progress_reporter(spec) for spec in specs])
    except Exception as error:
        for spec in specs:
            notify_ended(spec, failed_outcome(spec, error).status, f"{type(error).__name__}: {error}")
        raise
    for spec, outcome in zip(specs, outcomes):
        if not outcome.has_model:
            notify_ended(spec, outcome.status, outcome.error)
        publish_wandb_link(outcome, workspace)
    return outcomes
