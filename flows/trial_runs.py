"""Waiting on dispatched trial runs: re-running what a machine lost, riding out a server outage,
and cancelling for real at the deadline.

A trial run ends in one of three ways for the sweep:
- it handed back an outcome (Completed, or TrialFailed with its failed/diverged outcome): that
  outcome is the trial's, whatever it says; it is never re-run;
- it ended without one (Crashed: its process or container was killed; any other Failed), or
  it was lost (still Running, but no heartbeat for LOST_AFTER_SECONDS while the server was up:
  its worker or machine is gone): it is re-submitted, up to `trial_retries` more times. The new
  run trains from the trial's last checkpoint (checkpoints are keyed by the trial, not the run),
  or reuses the model if the lost run stored it before it died;
- the deadline passed: the run is cancelled through Prefect (Cancelling, so its worker stops the
  process), and marked Cancelled outright if no worker acts on that within CANCEL_GRACE_SECONDS.

Every attempt is recorded (flow run, how it ended, why), for summary.json and the report.

The Prefect server may go away while the sweep waits (a restart, an upgrade, a network cut): an
unreachable server is waited out, logged once when it goes and once when it is back, for as long
as the dispatch deadline allows. The trials keep training meanwhile; only their reports wait.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

import httpx
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Cancelled, Cancelling, Crashed

from tasks.reporting import progress as trial_progress
from tasks.results import TrialSpec

# The name of the Failed state a trial ends in when it failed or diverged on its own.
TRIAL_FAILED_STATE = "TrialFailed"
# How often the sweep asks the server whether its trial runs have finished.
TRIAL_POLL_SECONDS = 2.0
# The trial runs send a heartbeat this often (Prefect's minimum: 30 s). Set in their environment
# at submission, so no deployment needs to be changed for it.
HEARTBEAT_SECONDS = 30
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# The heartbeats are read this often (one query per running run), not at every poll.
HEARTBEAT_READ_SECONDS = 10.0
# A Running trial run with no heartbeat for this long, counted only while the server was up, is
# taken for lost: three heartbeats missed, and one more for a slow event pipeline.
LOST_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS
# After asking a worker to cancel a run (Cancelling), how long before it is marked Cancelled
# outright: a worker that is gone never answers.
CANCEL_GRACE_SECONDS = 30.0


def server_unreachable(error: BaseException) -> bool:
    """Errors that mean "the server is not answering now" (worth waiting out), not a refusal."""
    if isinstance(error, PrefectHTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, (httpx.TransportError, OSError))


@dataclass
class TrialRuns:
    """One trial's flow runs, oldest first, and how each ended that was not the last."""

    spec: TrialSpec
    runs: list[FlowRun]
    attempts: list[dict] = field(default_factory=list)
    final: FlowRun | None = None  # the run whose end is the trial's end
    timed_out: str | None = None  # why it had no end by the deadline
    gave_up: str | None = None  # why its last run ended without an outcome, with no retry left

    @property
    def current(self) -> FlowRun:
        return self.runs[-1]

    def attempt_records(self) -> list[dict]:
        """Every run of the trial: the ones that were re-run, with why, then the last one."""
        last = self.final or self.current
        state = last.state.type.value if last.state is not None else "PENDING"
        if self.gave_up:
            state = self.gave_up.split(":")[0]
        return self.attempts + [{"flow_run": str(last.id), "name": last.name,
                                 "ended": "TIMED_OUT" if self.timed_out else state,
                                 "reason": self.timed_out or self.gave_up}]


def ended_without_outcome(run: FlowRun) -> str | None:
    """Why a final run has no outcome to hand back (so the trial is re-run), or None.

    A trial that failed or diverged on its own ends in a Failed state named TRIAL_FAILED_STATE,
    its outcome as data (flows/trial.py); any other Failed state is the engine's (the trial's
    process lost the server, say), and its data, if any, is an exception, not an outcome."""
    state = run.state
    if state.type == StateType.CRASHED:
        return f"{state.name}: {state.message or 'its process ended without reporting'}"
    if state.type == StateType.FAILED and (state.name != TRIAL_FAILED_STATE or state.data is None):
        return f"{state.name} without an outcome: {state.message}"
    return None


def lost_reason(run: FlowRun, heard_at: datetime | None, running_since: datetime,
                server_up_since: datetime, now: datetime) -> str | None:
    """Why a Running run is taken for lost (its worker or machine vanished), or None.

    Every time is this process's clock, not the trial machine's (a node whose clock is behind
    would look silent): `heard_at` is when its newest heartbeat was first seen here,
    `running_since` when it was first seen Running. Time the server was unreachable does not
    count against it (no heartbeat could arrive then)."""
    if run.state is None or run.state.type != StateType.RUNNING:
        return None
    signs = [moment for moment in (heard_at, running_since, server_up_since) if moment is not None]
    silent = (now - max(signs)).total_seconds()
    if silent < LOST_AFTER_SECONDS:
        return None
    heard = "no new heartbeat" if heard_at else "no heartbeat since it started"
    return f"LOST: no sign of life for {silent:.0f} s ({heard}): its worker or machine is gone"


def last_heartbeat(client, run: FlowRun, since: datetime) -> datetime | None:
    """The newest heartbeat event of `run` since `since` (events come newest first)."""
    page = client.read_events(filter=EventFilter(
        occurred=EventOccurredFilter(since=since),
        event=EventNameFilter(name=[HEARTBEAT_EVENT]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])), limit=1)
    return page.events[0].occurred if page.events else None


class TrialRunWatcher:
    """Waits on the trial runs of one sweep until each has ended for good, or the deadline.

    `resubmit(spec, attempt)` submits a new run of a trial (attempt 2, 3, ...); `release(run)`
    frees what a dead run still holds (its device slot)."""

    def __init__(self, client, trials: list[TrialRuns], retries: int, deadline: float,
                 resubmit: Callable[[TrialSpec, int], FlowRun], release: Callable[[FlowRun], None],
                 log: Callable[[str], None], warn: Callable[[str], None]):
        self.client, self.trials, self.retries, self.deadline = client, trials, retries, deadline
        self.resubmit, self.release, self.log, self.warn = resubmit, release, log, warn
        self.server_up_since = datetime.now(timezone.utc)
        self.down_since: datetime | None = None
        self.started = self.server_up_since
        # flow run id: (its newest heartbeat, when this process first saw it), and when this
        # process first saw it Running: the clocks of the trial machines are not used
        self.heartbeats: dict[str, tuple[datetime, datetime]] = {}
        self.running_since: dict[str, datetime] = {}
        self.heartbeats_read = 0.0  # when they were last read (monotonic)

    # --- the server may be away -------------------------------------------------------------
    def _server_down(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = datetime.now(timezone.utc)
            self.warn(f"the Prefect server is unreachable ({type(error).__name__}: {error}); "
                      "the trials go on, the sweep waits for the server")

    def _server_up(self) -> None:
        if self.down_since is not None:
            now = datetime.now(timezone.utc)
            self.log(f"the Prefect server answers again after {(now - self.down_since).total_seconds():.0f} s")
            self.down_since, self.server_up_since = None, now

    def _calmly(self, action: Callable[[], object]) -> bool:
        """Run one round trip; False (and the outage noted) when the server is not answering."""
        try:
            action()
        except Exception as error:
            if not server_unreachable(error):
                raise
            self._server_down(error)
            return False
        self._server_up()
        return True

    # --- one look at every open trial -------------------------------------------------------
    def open_trials(self) -> list[TrialRuns]:
        return [trial for trial in self.trials if trial.final is None and trial.timed_out is None]

    def poll(self) -> None:
        open_trials = self.open_trials()
        current = {}

        def read() -> None:
            for trial in open_trials:
                current[trial.spec.name] = self.client.read_flow_run(trial.current.id)
            if time.monotonic() - self.heartbeats_read < HEARTBEAT_READ_SECONDS:
                return
            for run in current.values():
                if run.state is not None and run.state.type == StateType.RUNNING:
                    beat = last_heartbeat(self.client, run, self.started - timedelta(days=1))
                    if beat is not None and beat != self.heartbeats.get(str(run.id), (None,))[0]:
                        self.heartbeats[str(run.id)] = (beat, datetime.now(timezone.utc))
            self.heartbeats_read = time.monotonic()

        if not self._calmly(read):
            return
        now = datetime.now(timezone.utc)
        for trial in open_trials:
            run = current[trial.spec.name]
            trial.runs[-1] = run
            if run.state is not None and run.state.is_final():
                reason = ended_without_outcome(run)
                if reason is None:
                    trial.final = run
                else:
                    self._rerun(trial, run, reason)
            elif run.state is not None and run.state.type == StateType.RUNNING and (reason := lost_reason(
                    run, self.heartbeats.get(str(run.id), (None, None))[1],
                    self.running_since.setdefault(str(run.id), now), self.server_up_since, now)):
                self._rerun(trial, run, reason, lost=True)

    def _rerun(self, trial: TrialRuns, run: FlowRun, reason: str, lost: bool = False) -> None:
        attempt = len(trial.runs)
        if lost:  # the UI says what happened, and the run, should it come back, stops (flows/trial.py)
            self._set_state(run, Crashed(message=reason))
        self._calmly(lambda: self.release(run))
        if attempt > self.retries:
            self.warn(f"trial {trial.spec.name}: flow run {run.name} {reason}; no retries left "
                      f"(trial_retries {self.retries})")
            trial.final, trial.gave_up = run, reason
            return
        submitted: list[FlowRun] = []
        if not self._calmly(lambda: submitted.append(self.resubmit(trial.spec, attempt + 1))):
            return  # looked at again at the next poll, once the server answers
        trial.attempts.append({"flow_run": str(run.id), "name": run.name, "ended": reason.split(":")[0],
                               "reason": reason})
        trial.runs.append(submitted[0])
        self.warn(f"trial {trial.spec.name}: flow run {run.name} {reason}; re-submitted as "
                  f"{submitted[0].name} (attempt {attempt + 1} of {self.retries + 1}), resuming from "
                  "its last checkpoint")
        trial_progress.notify(trial.spec.name, 0, f"attempt {attempt + 1} of {self.retries + 1} ({reason.split(':')[0]})",
                              state="retrying", learning_rate=trial.spec.learning_rate, seed=trial.spec.seed)

    # --- the whole wait ----------------------------------------------------------------------
    def wait(self) -> None:
        while self.open_trials():
            self.poll()
            if not self.open_trials():
                return
            if time.monotonic() > self.deadline and self.down_since is None:
                self.cancel_open()
                return
            time.sleep(TRIAL_POLL_SECONDS)

    def cancel_open(self) -> None:
        """Cancel the runs still open at the deadline through their workers, so their processes
        stop; a run no worker stops within CANCEL_GRACE_SECONDS is marked Cancelled outright."""
        open_trials = self.open_trials()
        for trial in open_trials:
            state = trial.current.state
            waited = ("no worker took it (it is Late)" if state is not None and state.is_scheduled()
                      else f"it was still {state.name if state else 'pending'}")
            trial.timed_out = f"did not finish within the dispatch timeout: {waited}"
            self._set_state(trial.current, Cancelling(message="the sweep stopped waiting (dispatch timeout)"))
        grace = time.monotonic() + CANCEL_GRACE_SECONDS
        pending = list(open_trials)
        while pending and time.monotonic() < grace:
            time.sleep(TRIAL_POLL_SECONDS)
            pending = [trial for trial in pending if not self._ended(trial)]
        for trial in pending:
            self._set_state(trial.current, Cancelled(message="the sweep stopped waiting; no worker stopped it"))
            self._calmly(lambda run=trial.current: self.release(run))

    def _set_state(self, run: FlowRun, state) -> None:
        self._calmly(lambda: self.client.set_flow_run_state(run.id, state, force=True))

    def _ended(self, trial: TrialRuns) -> bool:
        """Whether the trial's current run is final now (its latest state kept)."""
        read: list[FlowRun] = []
        if not self._calmly(lambda: read.append(self.client.read_flow_run(trial.current.id))):
            return False
        trial.runs[-1] = read[0]
        return read[0].state is not None and read[0].state.is_final()
