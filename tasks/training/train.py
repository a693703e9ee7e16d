"""Training one trial: the plain PyTorch loop, checkpoints, and the trial task around it.

The loop keeps the dataset on the device as one tensor and takes each batch as an index slice of
a seeded per-epoch permutation (no DataLoader, no per-sample Python); losses and accuracies are
accumulated on the device and read once per epoch. Seeds fix the initial weights and every
epoch's order, so two CPU runs of one trial give bit-identical weights, and a trial resumed
from a checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo  # noqa: F401  (see make_optimizer)
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from torch import nn

from models.files import file_lock
from models.names import inside
from models.registry import ModelRegistry, RegistryError
from models.serialization import model_files, write_files
from models.sources import InputShape
from tasks.data.dataset import DatasetRef, Splits
from tasks.data.prepare import eval_batches, load_splits, train_batches
from tasks.evaluation.evaluate import eval_batch_size, measure, place_model
from tasks.provenance import code_version, package_versions
from tasks.reporting import progress as trial_progress
from tasks.reporting import tracking
from tasks.reporting.artifact_keys import artifact_key
from tasks.results import TrialOutcome, TrialSpec
from tasks.training.checkpoints import checkpointed_history, load_checkpoint, save_checkpoint
from tasks.training.determinism import RNG_LOCK, deterministic_mode, device_generator, shuffle
from tasks.training.devices import DeviceSlots, trial_stream
from tasks.training.identity import checkpoint_folder, input_shape, trial_key
from tasks.training.packing import AUTOCAST_DTYPES, DIVERGENCE_CHECK_STEPS, DIVERGENCE_LOSS, divergence_message
from tasks.training.schedules import schedule_of
from tasks.workspace import Workspace


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial is stopped and reported, never stored."""

    status = "diverged"  # what the W&B run and the outcome record

    def __init__(self, message: str, history: list[dict]):
        super().__init__(message)
        self.history = history


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    history: list[dict]
    train_seconds: float
    samples_per_second: float
    resumed_from: int | None = None


# torch.optim imports torch._dynamo when the first optimizer is made (0.6-0.8 s on 2 cores), which
# would fall between a trial's W&B start and its first step. Imported at the top, it loads with the
# rest of the sweep's modules (the CLI loads them with the garbage collector paused).
def make_optimizer(name: str, parameters, learning_rate: float, fused: bool | None = True,
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    """`fused`: one kernel updates every parameter (CPU and CUDA) instead of PyTorch's default
    (None) per-tensor loop on CPU (~8 small ops per tensor per step) or foreach on CUDA.
    Measured on 2 CPU cores, batch 64, best of 4 interleaved runs: Adam fused 3,985 images/s,
    the default loop 3,429, foreach 3,521. On a GPU, where a small CNN waits on kernel launches,
    one launch per step instead of several should save more (not measured: no GPU here).
    `weight_decay` None keeps each optimizer's own default (AdamW 0.01, Adam and SGD 0)."""
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, fused=fused, **decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, fused=fused, **decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, fused=fused, **decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: adam, adamw, sgd")


# torch's global RNG is shared by every thread; network initialisation draws from it under a
# lock right after seeding (as a pack's per-epoch reseeding does).
_init_lock = RNG_LOCK


def init_model(spec: TrialSpec, device: str | torch.device, shape: InputShape) -> nn.Module:
    with _init_lock:
        torch.manual_seed(spec.seed)
        model = spec.network.source().build(shape)
    return place_model(model, device)


class Precision:
    """Autocast for bf16/fp16 (fp16 with a gradient scaler); fp32 touches nothing."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device_type = name, device.type
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AUTOCAST_DTYPES[self.name])

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def restore(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def epoch_order(spec: TrialSpec, epoch: int, size: int, device) -> torch.Tensor:
    """The shuffle of one epoch: a function of (seed, epoch) alone, so resuming reproduces it."""
    return shuffle(spec.seed, epoch, size, device)


# --- the loop ----------------------------------------------------------------------------------

def train_trial(spec: TrialSpec, splits: Splits, device: str | torch.device,
                checkpoint_dir: Path | None = None,
                on_epoch: Callable[[dict], None] | None = None, stop_at: int | None = None) -> TrainResult:
    """Train one network for `spec.training.epochs` epochs, or up to `stop_at` of them (a search's rung:
    the schedule still spans every epoch); raises TrialDiverged as soon as the loss is not finite."""
    device = torch.device(device)
    model = init_model(spec, device, input_shape(splits.dataset))
    optimizer = make_optimizer(spec.training.optimizer, model.parameters(), spec.learning_rate, weight_decay=spec.training.weight_decay)
    precision = Precision(spec.training.precision, device)
    last_epoch = spec.training.epochs if stop_at is None else min(stop_at, spec.training.epochs)
    history: list[dict] = []
    first_epoch, resumed_from, seconds_before = 1, None, 0.0
    if checkpoint_dir is not None and (header := load_checkpoint(checkpoint_dir, spec, model, optimizer, last_epoch)):
        history, resumed_from = header["history"], header["epoch"]
        first_epoch, seconds_before = header["epoch"] + 1, header["train_seconds"]
        precision.restore(header.get("scaler"))
        if header["rng_state"] is not None:
            device_generator(device).set_state(header["rng_state"])
        for record in history:  # the restored epochs are reported too (a W&B run starts at epoch 1)
            if on_epoch is not None:
                on_epoch(record)

    size = splits.train_size
    steps_per_epoch = math.ceil(size / spec.training.batch_size)
    schedule = schedule_of(spec.training, spec.learning_rate, steps_per_epoch)
    started = time.perf_counter()
    step_seconds = 0.0
    for epoch in range(first_epoch, last_epoch + 1):
        model.train()
        order = epoch_order(spec, epoch, size, splits.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=splits.device)
        correct = torch.zeros((), dtype=torch.int64, device=splits.device)
        epoch_started = time.perf_counter()
        seen = 0
        for step, (batch_images, batch_labels) in enumerate(train_batches(splits, order, spec.training.batch_size)):
            if schedule.varies:
                rate = schedule.rate((epoch - 1) * steps_per_epoch + step)
                for group in optimizer.param_groups:
                    group["lr"] = rate
            with precision.autocast():
                logits = model(batch_images)
                loss = nn.functional.cross_entropy(logits, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            precision.step(loss, optimizer)
            seen += len(batch_labels)
            loss_sum += loss.detach() * len(batch_labels)
            correct += (logits.detach().argmax(dim=1) == batch_labels).sum()
            # The running mean holds every step's loss, so a spike between checks is not missed.
            if step % DIVERGENCE_CHECK_STEPS == 0 and not (running := loss_sum.item() / seen) < DIVERGENCE_LOSS:
                raise TrialDiverged(divergence_message(running, epoch, spec.learning_rate, step), history)
        train_loss = loss_sum.item() / size
        step_seconds += time.perf_counter() - epoch_started
        if not train_loss < DIVERGENCE_LOSS:
            raise TrialDiverged(divergence_message(train_loss, epoch, spec.learning_rate), history)
        val_loss, val_accuracy = measure(model, eval_batches(splits, "val", eval_batch_size(splits.device)))
        record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": correct.item() / size,
                  "val_loss": val_loss, "val_accuracy": val_accuracy,
                  "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, spec, epoch, model, optimizer, history,
                            seconds_before + time.perf_counter() - started, precision.state(),
                            device_generator(device).get_state())
        if on_epoch is not None:
            on_epoch(record)

    trained = size * (last_epoch - first_epoch + 1)
    return TrainResult(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        history=history,
        train_seconds=seconds_before + time.perf_counter() - started,
        samples_per_second=trained / step_seconds if step_seconds > 0 else 0.0,
        resumed_from=resumed_from,
    )


# --- one trial, end to end ----------------------------------------------------------------------

def engine_record(engine: str, pack: dict | None = None, reason: str | None = None) -> dict:
    """How a trial was trained, for its outcome (summary.json) and its model's metadata: the engine
    (eager | graph | packed | packed+graph), its pack ({id, size}) if any, why it trained otherwise
    than planned (a model vmap cannot run, a step that could not be captured) and whether
    deterministic algorithms were on."""
    return {"engine": engine, "pack": pack, "engine_reason": reason, "deterministic": deterministic_mode()}


def model_metadata(spec: TrialSpec, dataset: DatasetRef, sweep_id: str, key: str, result: TrainResult,
                   engine: dict) -> dict:
    final = result.history[-1]
    return engine | {
        "architecture": spec.network.source().architecture(input_shape(dataset)),
        "model_source": spec.network.source().record(input_shape(dataset)),
        "training": spec.record(),
        "metrics": {k: v for k, v in final.items() if k != "epoch"},
        "history": result.history,
        "train_seconds": result.train_seconds,
        "samples_per_second": result.samples_per_second,
        "dataset": dataset.as_metadata(),
        "sweep_id": sweep_id,
        "trial_key": key,
        "code": code_version(),
        "packages": package_versions(),
    }


def reuse_finished(spec: TrialSpec, registry: ModelRegistry, collection: str, key: str) -> TrialOutcome | None:
    """The outcome of a stored model of this exact trial whose files still pass their digest
    check; None when there is none (a damaged copy is not reused: the trial trains again)."""
    try:
        candidates = [v for v in registry.versions(collection) if v.metadata.get("trial_key") == key]
    except (RegistryError, FileNotFoundError):
        return None
    for info in reversed(candidates):
        try:
            stored = registry.fetch(info.ref)
        except RegistryError:
            continue
        return TrialOutcome(
            learning_rate=spec.learning_rate, seed=spec.seed, status="reused", model=stored.ref,
            history=stored.metadata["history"], train_seconds=0.0,  # trained now: nothing (its own seconds
            cached=True, reused_from=str(stored.ref))  # are in the stored version's metadata)
    return None


def reused_status(reused: TrialOutcome) -> str:
    """What the UI's progress and the live view say of a reused trial."""
    return f"0 s trained now, from {reused.reused_from}"


def no_progress(percent: float, status: str, **details) -> None:
    pass


def run_config(spec: TrialSpec, dataset: DatasetRef, device: str, key: str) -> dict:
    """A trial's W&B run config."""
    return spec.record() | {"dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint,
                            "train_size": dataset.train_size, "device": device, "trial_key": key}


def epoch_reporter(spec: TrialSpec, dataset: DatasetRef, run, device: str, log: Callable[[str], None],
                   progress: Callable[[float, str], None]) -> Callable[[dict], None]:
    """What a trial does after each epoch: its W&B run's curves, a log line, its progress."""
    epoch_started = [time.perf_counter()]

    def report_epoch(record: dict) -> None:
        now = time.perf_counter()
        images_per_second = dataset.train_size / (now - epoch_started[0])
        epoch_started[0] = now
        tracking.log_epoch(run, record)
        log(f"[{spec.name}] epoch {record['epoch']}/{spec.training.epochs}: "
            f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
            f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}")
        progress(100 * record["epoch"] / spec.training.epochs,
                 f"epoch {record['epoch']}/{spec.training.epochs} on {device}, {images_per_second:,.0f} images/s, "
                 f"val acc {record['val_accuracy']:.4f}",
                 epoch=record["epoch"], record=record, images_per_second=images_per_second)

    return report_epoch


def store_trained(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, key: str, run, device: str,
                  result: TrainResult, engine: dict, log: Callable[[str], None]) -> TrialOutcome:
    """A trained trial's model stored in the registry and its W&B run; its outcome."""
    metadata = model_metadata(spec, dataset, workspace.sweep_id, key, result, engine)
    aliases = (spec.name, f"sweep-{workspace.sweep_id}")
    # With the wandb backend the registry logs the model as this run's artifact (lineage);
    # with the local one the same bytes also go into the run (uploaded by `wandb sync`).
    ref = workspace.registry.open().log_model(workspace.collection, result.state_dict, metadata, aliases, run=run)
    if workspace.registry.backend != "wandb":
        paths = write_files(model_files(result.state_dict, metadata), workspace.sweep_dir / "models" / spec.name)
        tracking.log_model_artifact(run, collection=workspace.collection, files=paths,
                                    metadata=metadata | {"registry_ref": str(ref), "digest": ref.digest},
                                    aliases=list(aliases))
    run.summary.update({**metadata["metrics"], "status": "completed", "model": str(ref),
                        "digest": ref.digest, "train_seconds": result.train_seconds,
                        "samples_per_second": result.samples_per_second, "engine": engine["engine"]})
    log(f"[{spec.name}] stored {ref.short} ({result.samples_per_second:,.0f} images/s on {device}, "
        f"{engine['engine']})")
    return TrialOutcome(
        learning_rate=spec.learning_rate, seed=spec.seed, status="completed", model=ref,
        history=result.history, train_seconds=result.train_seconds,
        samples_per_second=result.samples_per_second, resumed_from=result.resumed_from,
        device=device, wandb_run_dir=tracking.run_directory(run), wandb_url=tracking.run_url(run), **engine)


def train_and_store(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, key: str, device: str,
                    checkpoint_dir: Path, log: Callable[[str], None],
                    progress: Callable[[float, str], None] = no_progress) -> TrialOutcome:
    """Train (or resume) on `device`, store the model, record all of it in the trial's W&B run."""
    started = time.perf_counter()
    splits = load_splits(dataset, device)
    wandb_started = time.perf_counter()
    with tracking.trial_run(workspace.tracking, group=workspace.sweep_id, name=spec.name,
                            run_dir=workspace.sweep_dir, config=run_config(spec, dataset, device, key)) as run:
        wandb_start_seconds = time.perf_counter() - wandb_started
        report_epoch = epoch_reporter(spec, dataset, run, device, log, progress)
        setup_seconds = time.perf_counter() - started  # data on the device, W&B run started
        with trial_stream(device):
            result = train_trial(spec, splits, device, checkpoint_dir, report_epoch)
        outcome = store_trained(spec, dataset, workspace, key, run, device, result, engine_record("eager"), log)
    return outcome.model_copy(update={"setup_seconds": setup_seconds, "wandb_start_seconds": wandb_start_seconds})


def run_trial(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots,
              log: Callable[[str], None] = print,
              progress: Callable[[float, str], None] = no_progress) -> TrialOutcome:
    """Reuse, resume or train one trial. Raises on failure (TrialDiverged when it diverged).

    `progress(percent, status)` hears where the trial is: waiting for a device, each epoch, done.
    Two sweeps of the same trial (a schedule and a manual run) take the trial's lock in turn: the
    second one then finds the first one's model and reuses it, instead of both writing one
    checkpoint folder."""
    key = trial_key(spec, dataset)
    with trial_lock(spec, dataset, workspace) as checkpoint_dir:
        if (reused := reuse_finished(spec, workspace.registry.open(), workspace.collection, key)) is not None:
            log(f"[{spec.name}] reusing {reused.model.short}: this trial already finished with the "
                "same config, data and code")
            progress(100, reused_status(reused), state="reused", model=reused.model.short)
            return reused
        progress(0, "waiting for a device slot", state="waiting")
        with slots.take() as device:
            progress(0, f"training on {device}", state="training")
            outcome = train_and_store(spec, dataset, workspace, key, device, checkpoint_dir, log, progress)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is stored: done with it
    progress(100, f"stored {outcome.model.short}", state="done", model=outcome.model.short)
    return outcome


@contextlib.contextmanager
def trial_lock(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace):
    """The trial's checkpoint folder, held for the block: one process at a time trains a trial."""
    folder = checkpoint_folder(spec, dataset)
    with file_lock(workspace.checkpoint_root, f".{folder}.lock"):
        yield inside(workspace.checkpoint_root, folder)


def train_until(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots, epoch: int,
                log: Callable[[str], None] = print,
                progress: Callable[[float, str], None] = no_progress) -> list[dict]:
    """A search's rung: the trial trained (or resumed) up to `epoch` and checkpointed there, not
    stored; its history. A trial a previous search already finished is not trained again: its
    stored history answers."""
    with trial_lock(spec, dataset, workspace) as checkpoint_dir:
        stored = reuse_finished(spec, workspace.registry.open(), workspace.collection, trial_key(spec, dataset))
        if stored is not None:
            progress(100 * epoch / spec.training.epochs, f"rung {epoch}: from the stored {stored.model.short}")
            return stored.history[:epoch]
        if len(history := checkpointed_history(checkpoint_dir)) >= epoch:  # a killed search got further
            return history[:epoch]
        progress(0, "waiting for a device slot")
        with slots.take() as device:
            def report(record: dict) -> None:
                log(f"[{spec.name}] epoch {record['epoch']}/{epoch} (rung): val loss {record['val_loss']:.4f} "
                    f"acc {record['val_accuracy']:.4f}")
                progress(100 * record["epoch"] / spec.training.epochs, f"epoch {record['epoch']} (rung {epoch}) on {device}")

            result = train_trial(spec, load_splits(dataset, device), device, checkpoint_dir, report, stop_at=epoch)
    return result.history


def saved_history(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace) -> list[dict]:
    """The epochs the trial's checkpoint holds (a trial an earlier run of a search stopped)."""
    return checkpointed_history(inside(workspace.checkpoint_root, checkpoint_folder(spec, dataset)))


def record_stopped(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, history: list[dict],
                   rung: int) -> TrialOutcome:
    """A trial a search stopped at `rung`: its W&B run (epochs and status), never a stored model."""
    history = history or saved_history(spec, dataset, workspace)[:rung]
    with tracking.trial_run(workspace.tracking, group=workspace.sweep_id, name=spec.name,
                            run_dir=workspace.sweep_dir, config=spec.record() | {"dataset": dataset.name}) as run:
        for record in history:
            tracking.log_epoch(run, record)
        run.summary.update({"status": "stopped", "stopped_at_epoch": rung})
        run_dir = tracking.run_directory(run)
    return TrialOutcome(learning_rate=spec.learning_rate, seed=spec.seed, status="stopped", history=history,
                        stopped_at=rung, wandb_run_dir=run_dir)


def failed_outcome(spec: TrialSpec, error: BaseException) -> TrialOutcome:
    """A trial that raised, as data: diverged or failed, with the error and the epochs it had."""
    return TrialOutcome(learning_rate=spec.learning_rate, seed=spec.seed,
                        status="diverged" if isinstance(error, TrialDiverged) else "failed", error=f"{type(error).__name__}: {error}",
                        history=getattr(error, "history", []))


@task(name="train_model", task_run_name="train lr={spec.learning_rate} seed={spec.seed}",
      cache_policy=NO_CACHE)
def train_model(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots,
                still_wanted: Callable[[], None] | None = None) -> TrialOutcome:
    """One trial. Reuse of finished trials goes through the registry, not Prefect's cache.

    In the UI: a progress artifact (waiting for a device slot, then each epoch) and, once the
    trial ran, a link to its W&B run. `still_wanted`, called before training and after every
    epoch but the last, raises to stop a trial whose run was given up on (a dispatched trial's
    run, flows/trial.py)."""
    try:
        outcome = run_trial(spec, dataset, workspace, slots, log=get_run_logger().info,
                            progress=progress_reporter(spec, still_wanted))
    except Exception as error:
        notify_ended(spec, failed_outcome(spec, error).status, f"{type(error).__name__}: {error}")
        raise
    publish_wandb_link(outcome, workspace)
    return outcome


def progress_reporter(spec: TrialSpec, still_wanted: Callable[[], None] | None = None) -> Callable[..., None]:
    """A trial's progress(percent, status, **details): its progress artifact in the UI and the live view."""
    progress_id = create_progress_artifact(0.0, key=artifact_key("progress", spec.name),
                                           description=f"{spec.name}: starting")

    def progress(percent: float, status: str, **details) -> None:
        try:
            update_progress_artifact(progress_id, percent, description=f"{spec.name}: {status}")
        except Exception as error:  # the server is away: the trial trains on, unseen for a while
            get_run_logger().warning(f"[{spec.name}] progress not shown ({type(error).__name__}: {error})")
        trial_progress.notify(spec.name, percent, status, learning_rate=spec.learning_rate, seed=spec.seed,
                              epochs=spec.training.epochs, **details)
        if still_wanted is not None and percent < 100:
            still_wanted()

    return progress


def notify_ended(spec: TrialSpec, state: str, message: str) -> None:
    """The live view hears how a trial that did not complete ended (failed, diverged)."""
    trial_progress.notify(spec.name, 100, message, state=state, learning_rate=spec.learning_rate, seed=spec.seed)


def publish_wandb_link(outcome: TrialOutcome, workspace: Workspace) -> None:
    """A link artifact to the trial's W&B run: its page online; offline, its folder and the
    command that uploads it."""
    if outcome.wandb_url:
        create_link_artifact(outcome.wandb_url, link_text=f"W&B run {outcome.name}", key=artifact_key("wandb", outcome.name),
                             description=f"W&B run of trial {outcome.name}")
    elif outcome.wandb_run_dir:
        create_link_artifact(
            f"file://{outcome.wandb_run_dir}", link_text=f"offline W&B run {outcome.name}",
            key=artifact_key("wandb", outcome.name),
            description=f"Offline W&B run of trial {outcome.name} in `{outcome.wandb_run_dir}`; upload the "
                        f"sweep with `lr-sweep publish {workspace.sweep_id} --output-dir {workspace.sweep_dir.parent}`")


@task(name="train_until", task_run_name="train lr={spec.learning_rate} to epoch {epoch}", cache_policy=NO_CACHE)
def train_until_task(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, slots: DeviceSlots,
                     epoch: int) -> list[dict]:
    """One rung of a search for one trial (checkpointed, not stored)."""
    return train_until(spec, dataset, workspace, slots, epoch, log=get_run_logger().info,
                       progress=lambda percent, status, **details: trial_progress.notify(
                           spec.name, percent, status, learning_rate=spec.learning_rate, seed=spec.seed,
                           epochs=spec.training.epochs, **details))


@task(name="record_stopped", task_run_name="stopped lr={spec.learning_rate} at epoch {rung}", cache_policy=NO_CACHE)
def record_stopped_task(spec: TrialSpec, dataset: DatasetRef, workspace: Workspace, history: list[dict],
                        rung: int) -> TrialOutcome:
    outcome = record_stopped(spec, dataset, workspace, history, rung)
    trial_progress.notify(spec.name, 100, f"stopped by the search at epoch {rung}", state="stopped",
                          learning_rate=spec.learning_rate, seed=spec.seed)
    return outcome
