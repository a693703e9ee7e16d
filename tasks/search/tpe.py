"""Bayesian search over the learning rate: Optuna's TPE sampler proposes rates (log-uniform
prior) in batches of `parallel`, and each batch runs through the same rungs with the same
promotion rule as successive halving, against every score seen at that rung so far. The study
lives in an RDB storage (SQLite file by default), so a killed search resumes where it stopped;
trials left running by a process that is gone are found by their owner (`/proc` start time and
boot id) and asked again.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.serialization import identity_digest
from tasks.evaluation.ranking import higher_is_better, rank
from tasks.search.checks import check_int, check_lr_range
from tasks.search.config import masked_url
from tasks.search.halving import TrainTo, check_rungs, record_at, survivors

if TYPE_CHECKING:  # optuna is imported where it is used: the rest of the module does not need it
    import optuna

PARAM = "learning_rate"  # the one Optuna parameter
# While a batch trains, its trials' heartbeat attribute is refreshed this often...
TRIAL_HEARTBEAT_SECONDS = 60.0
# ...so a RUNNING trial of another host (another container) silent for this long has lost its
# driver: the next search on the study takes it over.
STALE_AFTER_SECONDS = 600.0

class StudyStorageError(RuntimeError):
    """The Optuna storage cannot be opened (bad URL, unreachable server, driver missing)."""


def default_storage_url(output_dir: str | Path) -> str:
    """sqlite:///OUTPUT_DIR/optuna.db (absolute), the storage when none is given."""
    return f"sqlite:///{(Path(output_dir) / 'optuna.db').resolve()}"


def check_storage(url: str, connect_timeout_s: int = 10) -> None:
    """Whether the study storage `url` can be used, found without writing to it: a database
    server is connected to and asked `SELECT 1`; an SQLite file's folder must be creatable and
    writable (the file itself is made by the sweep). Raises StudyStorageError."""
    import sqlalchemy

    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        probe = Path(path).parent if path and path != ":memory:" else Path(".")
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise StudyStorageError(f"cannot create the folder of the study storage {url}: {probe} "
                                    "is not a writable directory")
        return
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": connect_timeout_s},
                                          poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT 1"))
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError, TypeError) as error:
        kind = "its database driver is not installed" if isinstance(error, ImportError) else "it cannot be reached or opened"
        raise StudyStorageError(
            f"cannot open the Optuna study storage {masked_url(url)} ({kind}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def startup_trials(n_trials: int) -> int:
    """Trials sampled at random before TPE models the rest: a third of the budget, between 1 and
    Optuna's default of 10 (with its default, a 9-trial search never got past random sampling)."""
    return max(1, min(10, n_trials // 3))


def sampler_seed(seed: int, trials_so_far: int) -> int:
    """The sampler's seed for a search that resumes a study of `trials_so_far` trials: a fresh
    sampler with the first run's seed would propose that run's rates again (a killed search,
    resumed, tried the same rates twice and fewer distinct ones in all)."""
    return seed if trials_so_far == 0 else int(identity_digest({"seed": seed, "resume_at": trials_so_far})[:8], 16)


def _import_optuna():
    try:
        import optuna
    except ImportError as error:  # pragma: no cover - the project pins it
        raise ImportError("the TPE search needs optuna: pip install optuna==5.0.0") from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(storage: str, study_name: str = "lr-search", seed: int = 0, *,
               direction: str = "maximize", n_startup_trials: int = 10,
               connect_timeout_s: int = 10) -> "optuna.Study":
    """Create or load (same name: resume) an Optuna study on an RDB storage.

    `storage`: an SQLAlchemy URL, `sqlite:///path/optuna.db` (the default of the flow,
    `default_storage_url(OUTPUT_DIR)`; its folder is created) or `postgresql://user@host/db`
    for several workers. TPE is seeded with `seed` (in a study that has trials already, with a
    seed derived from it and their number: `sampler_seed`), uses the constant liar (the trials of a batch
    that are still running count as if they had a poor value, so one batch does not propose the
    same rate `parallel` times) and samples at random for its first `n_startup_trials`. No Optuna
    pruner: `tpe_search` decides the stops itself (see there). A server that does not answer
    within `connect_timeout_s`, a missing driver or a malformed URL raise StudyStorageError.
    """
    optuna = _import_optuna()
    import sqlalchemy.exc

    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    check_int("n_startup_trials", n_startup_trials, 0)
    url = str(storage)
    engine_kwargs: dict = {}
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StudyStorageError(f"cannot create the folder of the study storage {url}: {error}") from error
        # Several processes on one SQLite file wait for the write lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"connect_timeout": connect_timeout_s}, "pool_pre_ping": True}
    try:
        rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        study = optuna.create_study(storage=rdb, study_name=study_name, sampler=optuna.samplers.RandomSampler(),
                                    pruner=optuna.pruners.NopPruner(), direction=direction,
                                    load_if_exists=True)
        # Seeded from the study's state: a resumed search goes on with new rates.
        study.sampler = optuna.samplers.TPESampler(
            seed=sampler_seed(seed, len(study.get_trials(deepcopy=False))),
            n_startup_trials=n_startup_trials, constant_liar=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as error:
        kind = "its database driver is not installed" if isinstance(error, ImportError) else "it cannot be reached or opened"
        raise StudyStorageError(
            f"cannot open the Optuna study storage {masked_url(url)} ({kind}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Give a reachable "
            "storage URL (sqlite:///path/optuna.db, postgresql://user@host/db with psycopg2 installed)") from None
    if study.direction.name.lower() != direction:
        raise ValueError(f"study {study_name!r} in {masked_url(url)} was created to {study.direction.name.lower()}, "
                         f"not {direction}: use another study_name")
    return study


def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a process, None when there is no such process
    or no /proc: with the pid it identifies one process (a pid may be reused, this pair not)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_owner() -> dict:
    """Who runs a trial: host, boot, pid and the process's start time."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "start": _proc_start(os.getpid())}


def _owner_alive(owner: dict) -> bool | None:
    """True/False when this machine can tell whether the owner process still runs, None when
    the owner is on another host (or container: another hostname)."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") and owner.get("boot_id") != _boot_id():
        return False  # the machine rebooted since
    pid = int(owner.get("pid", -1))
    if owner.get("start") is not None:
        return _proc_start(pid) == owner["start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(trial, stale_after_s: float | None, now: float) -> bool:
    owner = trial.user_attrs.get("owner")
    if owner is not None:
        alive = _owner_alive(owner)
        if alive is not None:
            return not alive
    # Another host, or no owner recorded yet (killed between ask and the first attribute): judged
    # by the last heartbeat (set at ask and at every rung), when the caller gave a limit; without
    # one a trial of another host is never taken over, and one with no owner after a minute is.
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    heartbeat = trial.user_attrs.get("heartbeat", started)
    if stale_after_s is not None:
        return now - heartbeat > stale_after_s
    return owner is None and now - started > 60


def recover_stale_trials(study: "optuna.Study", stale_after_s: float | None = STALE_AFTER_SECONDS) -> list[int]:
    """Fail the RUNNING trials whose driver is gone, and enqueue their learning rates again.

    A trial is gone when its owner (recorded at ask) ran on this host and that process no longer
    exists (pid and start time, so a reused pid does not count), or, for a trial of another host,
    when its heartbeat is older than `stale_after_s` (default STALE_AFTER_SECONDS; a live driver
    refreshes it every TRIAL_HEARTBEAT_SECONDS while it trains; None: never). The rate is enqueued
    (`study.enqueue_trial`) before the trial is failed, and only when no WAITING trial already
    has it, so a crash in between does not enqueue it twice; the re-asked trial trains the same
    rate, whose checkpoints the caller's `train_to` finds again. Returns the failed trial numbers.
    """
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    now = time.time()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        if not _is_stale(trial, stale_after_s, now):
            continue
        if PARAM in trial.params:
            waiting = [t.system_attrs.get("fixed_params", t.params).get(PARAM)
                       for t in study.get_trials(deepcopy=False, states=(state.WAITING,))]
            if trial.params[PARAM] not in waiting:
                study.enqueue_trial({PARAM: trial.params[PARAM]}, user_attrs={"requeued_from": trial.number})
        study.tell(trial.number, state=state.FAIL, skip_if_finished=True)
        recovered.append(trial.number)
    return recovered


@dataclass
class SearchTrial:
    number: int
    learning_rate: float
    state: str  # complete | pruned | failed
    value: float | None  # the metric at the last epoch it was trained to
    epochs_trained: int
    stopped_at: int | None  # the rung epoch of a pruned trial
    requeued_from: int | None = None


@dataclass
class TPEResult:
    """The study as `tpe_search` left it (this call's trials and those of earlier, resumed ones)."""

    trials: list[SearchTrial]  # the ones that count towards n_trials (complete, pruned, diverged)
    best: SearchTrial | None  # the best complete trial (ties as in `rank`)
    epochs_trained: int  # sum over `trials` (what the search's decisions cost; see note in tpe_search)
    trained_now: list[int]  # numbers of the trials this call trained
    recovered: list[int]  # stale trials this call failed and re-enqueued
    stopped_by: str  # n_trials | epoch_budget

    def as_dict(self) -> dict:
        return asdict(self)


def _search_config(lr_range, rungs, metric, reduction_factor) -> dict:
    return {"lr_range": [float(lr_range[0]), float(lr_range[1])], "rungs": list(rungs),
            "metric": metric, "reduction_factor": reduction_factor}


def _summarise(study, higher: bool) -> tuple[list[SearchTrial], SearchTrial | None]:
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state == state.FAIL and not t.user_attrs.get("diverged"):
            continue  # abandoned by a killed driver: re-asked under a new number
        if t.state not in (state.COMPLETE, state.PRUNED, state.FAIL):
            continue
        name = {state.COMPLETE: "complete", state.PRUNED: "pruned", state.FAIL: "failed"}[t.state]
        trials.append(SearchTrial(
            number=t.number, learning_rate=t.params.get(PARAM), state=name,
            value=t.value if t.state != state.FAIL else None,
            epochs_trained=int(t.user_attrs.get("epochs_trained", 0)),
            stopped_at=t.last_step if t.state == state.PRUNED else None,
            requeued_from=t.user_attrs.get("requeued_from")))
    complete = {t.number: t for t in trials if t.state == "complete"}
    losses = {t.number: t.user_attrs.get(f"val_loss@{t.last_step}")
              for t in study.get_trials(deepcopy=False, states=(state.COMPLETE,))}
    order = rank({n: t.value for n, t in complete.items()}, higher, losses,
                 {n: t.learning_rate for n, t in complete.items()})
    return trials, (complete[order[0]] if order else None)


def tpe_search(study: "optuna.Study", n_trials: int, parallel: int, lr_range: tuple[float, float],
               rungs: Sequence[int], train_to: TrainTo, metric: str = "val_accuracy", *,
               reduction_factor: int = 3, epoch_budget: int | None = None,
               stale_after_s: float | None = STALE_AFTER_SECONDS,
               log: Callable[[str], None] | None = None) -> TPEResult:
    """TPE over a log-uniform learning rate in `lr_range`, `parallel` trials at a time, each
    trained through `rungs` with early stopping; resumable on the same study.

    Per batch: `parallel` trials are asked (each proposes a rate; enqueued rates come first),
    `train_to(rates, rung)` trains them rung by rung; at each rung every trial reports its
    metric (`trial.report(value, epoch)`) and is stopped (told PRUNED) unless it is among the
    best ceil(n / eta) of ALL the scores recorded at that rung so far, in this study, this batch
    included (`survivors`, the same rule and ties as `successive_halving`). Trials that reach the
    last rung are told COMPLETE with their metric there.

    Why not Optuna's SuccessiveHalvingPruner: it decides for one trial at the moment that trial
    reports, against whatever else is in the storage, so within a batch the outcome depends on
    the order of the reports, and the first trials of a study are promoted for want of
    competitors; deciding once per rung for the whole batch keeps the rule synchronous, order-
    free and identical to the successive-halving driver. The rung scores come from the storage
    (intermediate values, val_loss in user attributes), so a resumed search decides as an
    uninterrupted one would.

    Stops when `n_trials` trials are finished (COMPLETE, PRUNED, or failed by divergence), or,
    with `epoch_budget`, before asking a batch once the finished trials' epochs reach it (the
    last batch may overshoot by up to its own cost). Resume: the same study (storage and name)
    continues; finished trials count and are not retrained; trials left RUNNING by a killed
    driver are failed and their rates asked again (`recover_stale_trials`); on an exception in
    `train_to` (or Ctrl-C) the open trials of the batch are failed and re-enqueued the same way
    before it propagates. A study created with a different rate range, rungs, metric or eta is
    refused. `epochs_trained` counts each trial's epochs once (a re-asked trial resumed from its
    checkpoint is counted up to the epoch it reached, not twice).
    """
    optuna = _import_optuna()
    check_int("n_trials", n_trials, 1)
    check_int("parallel", parallel, 1)
    check_int("reduction_factor", reduction_factor, 2)
    if epoch_budget is not None:
        check_int("epoch_budget", epoch_budget, 1)
    if not (isinstance(lr_range, (tuple, list)) and len(lr_range) == 2):
        raise ValueError(f"lr_range must be (min, max), got {lr_range!r}")
    check_lr_range(lr_range[0], lr_range[1], ("lr_range min", "lr_range max"))
    rungs = check_rungs(rungs)
    higher = higher_is_better(metric)
    wanted = "maximize" if higher else "minimize"
    if study.direction.name.lower() != wanted:
        raise ValueError(f"metric {metric!r} is to {wanted}, but the study was created to "
                         f"{study.direction.name.lower()}: open_study(..., direction={wanted!r})")
    config = _search_config(lr_range, rungs, metric, reduction_factor)
    recorded = study.user_attrs.get("search_config")
    if recorded is None:
        study.set_user_attr("search_config", config)
    elif recorded != config:
        different = [k for k in config if recorded.get(k) != config[k]]
        raise ValueError(f"study {study.study_name!r} was run with {', '.join(f'{k}={recorded.get(k)}' for k in different)}; "
                         f"this search asks for {', '.join(f'{k}={config[k]}' for k in different)}: "
                         "resume with the same settings or use another study_name")
    say = log or (lambda message: None)
    distribution = {PARAM: optuna.distributions.FloatDistribution(lr_range[0], lr_range[1], log=True)}

    recovered = recover_stale_trials(study, stale_after_s)
    if recovered:
        say(f"resumed study {study.study_name!r}: trials {recovered} were left running by a stopped "
            "search; failed and their learning rates queued again")
    trained_now: list[int] = []
    stopped_by = "n_trials"
    while True:
        done, _ = _summarise(study, higher)
        remaining = n_trials - len(done)
        if remaining <= 0:
            break
        spent = sum(t.epochs_trained for t in done)
        if epoch_budget is not None and spent >= epoch_budget:
            stopped_by = "epoch_budget"
            break
        batch = []
        try:
            for _ in range(min(parallel, remaining)):
                trial = study.ask(distribution)
                batch.append(trial)
                trial.set_user_attr("owner", process_owner())
                trial.set_user_attr("heartbeat", time.time())
            trained_now.extend(t.number for t in batch)
            say(f"trials {[t.number for t in batch]}: learning rates "
                f"{', '.join(f'{t.params[PARAM]:.4g}' for t in batch)}")
            with heartbeats(batch):
                _run_batch(study, batch, rungs, train_to, metric, higher, reduction_factor, say)
        except BaseException:
            _abandon(study, batch)
            raise
    trials, best = _summarise(study, higher)
    return TPEResult(trials=trials, best=best, epochs_trained=sum(t.epochs_trained for t in trials),
                     trained_now=trained_now, recovered=recovered, stopped_by=stopped_by)


@contextlib.contextmanager
def heartbeats(batch, every: float | None = None):
    """Refresh the heartbeat of the batch's trials while the block runs (a rung may train for
    longer than STALE_AFTER_SECONDS); a trial told meanwhile is skipped."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every or TRIAL_HEARTBEAT_SECONDS):
            for trial in batch:
                with contextlib.suppress(Exception):  # finished meanwhile, storage busy: next time
                    trial.set_user_attr("heartbeat", time.time())

    thread = threading.Thread(target=beat, name="tpe-heartbeats", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _rung_pool(study, rung: int, exclude: set[int]) -> tuple[dict, dict, dict]:
    """Scores, val losses and rates at `rung` of every finished (complete or pruned) trial."""
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    scores, losses, rates = {}, {}, {}
    for t in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)):
        if t.number in exclude or rung not in t.intermediate_values:
            continue
        scores[t.number] = t.intermediate_values[rung]
        losses[t.number] = t.user_attrs.get(f"val_loss@{rung}")
        rates[t.number] = t.params.get(PARAM)
    return scores, losses, rates


def _run_batch(study, batch, rungs, train_to, metric, higher, reduction_factor, say) -> None:
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    open_trials = {t.number: t for t in batch}
    rate = {t.number: t.params[PARAM] for t in batch}
    for position, rung in enumerate(rungs):
        if not open_trials:
            return
        # One training per distinct rate: two trials of a batch may share an enqueued rate.
        histories = train_to(sorted({rate[n] for n in open_trials}), rung)
        scores, losses = {}, {}
        for number, trial in list(open_trials.items()):
            record = record_at(histories.get(rate[number]), rung)
            trial.set_user_attr("epochs_trained", rung)
            trial.set_user_attr("heartbeat", time.time())
            if record is None or not math.isfinite(record.get(metric, math.nan)):
                trial.set_user_attr("diverged", True)
                study.tell(trial, state=state.FAIL)
                del open_trials[number]
                say(f"trial {number} (lr {rate[number]:.4g}) failed before epoch {rung}")
                continue
            trial.report(record[metric], rung)
            trial.set_user_attr(f"val_loss@{rung}", record.get("val_loss"))
            scores[number], losses[number] = record[metric], record.get("val_loss")
        if position == len(rungs) - 1:
            for number, trial in open_trials.items():
                trial.set_user_attr("history", list(histories[rate[number]][:rung]))
                study.tell(trial, scores[number])
                say(f"trial {number} (lr {rate[number]:.4g}) complete: {metric} {scores[number]:.4f}")
            return
        pool, pool_losses, pool_rates = _rung_pool(study, rung, exclude=set(open_trials))
        pool.update(scores)
        pool_losses.update(losses)
        pool_rates.update({n: rate[n] for n in scores})
        kept, _ = survivors(pool, reduction_factor, higher, pool_losses, pool_rates)
        for number in list(open_trials):
            if number not in kept:
                study.tell(open_trials.pop(number), state=state.PRUNED)
                say(f"trial {number} (lr {rate[number]:.4g}) stopped at epoch {rung}: "
                    f"{metric} {scores[number]:.4f} not in the best {len(kept)} of {len(pool)}")


def _abandon(study, batch) -> None:
    """The batch's trials that are still open: re-enqueue their rates, then fail them."""
    optuna = _import_optuna()
    state = optuna.trial.TrialState
    for trial in batch:
        running = {t.number for t in study.get_trials(deepcopy=False, states=(state.RUNNING,))}
        if trial.number not in running:
            continue
        waiting = [t.system_attrs.get("fixed_params", t.params).get(PARAM)
                   for t in study.get_trials(deepcopy=False, states=(state.WAITING,))]
        if trial.params.get(PARAM) is not None and trial.params[PARAM] not in waiting:
            study.enqueue_trial({PARAM: trial.params[PARAM]}, user_attrs={"requeued_from": trial.number})
        study.tell(trial, state=state.FAIL, skip_if_finished=True)


def study_name(config_identity: dict) -> str:
    """One study per search: the same command (same data, network, range, rungs) gives the same
    name, so running it again resumes the study."""
    return "lr-search-" + identity_digest(config_identity)[:16]
