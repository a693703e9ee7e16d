"""Machines that die, checked without a server: a torn line in the promotions log, how the sweep
decides that a trial run is to be run again (crashed, lost, no outcome) and how it waits out a
server that does not answer. The same with real servers, workers and SIGKILLs is in
tests/test_faults_dispatch.py (slow)."""

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Crashed, Failed, Running

from flows import trial, trial_runs
from flows.dispatch import outcome_of_trial
from flows.trial import (
    TrialSuperseded,
    ensure_device_limits,
    record_slot,
    slot_record_name,
    still_wanted,
    take_slot,
    worker_device,
)
from flows.trial_runs import (
    LOST_AFTER_SECONDS,
    TRIAL_FAILED_STATE,
    TrialRuns,
    TrialRunWatcher,
    ended_without_outcome,
    lost_reason,
)
from models.local_registry import LocalRegistry
from tasks.reporting.report import attempt_lines
from tests.helpers import COLLECTION, tiny_model, trial_spec

SPEC = trial_spec(learning_rate=0.01, seed=0, epochs=1, batch_size=64, hidden_units=8)


# --- the promotions log -------------------------------------------------------------------------

def test_a_torn_line_in_the_promotions_log_never_changes_the_replayed_moves(tmp_path):
    """Before: the parse stopped at a torn line in the middle of promotions.jsonl, so recovery
    replayed the move before it, and a rollback logged after it was undone by the next write."""
    registry = LocalRegistry(tmp_path)
    v0, v1 = (registry.log_model(COLLECTION, *tiny_model(seed)) for seed in (0, 1))
    registry.move_alias(v0, "production")
    registry.move_alias(v1, "production")
    log = tmp_path / COLLECTION / "promotions.jsonl"
    with open(log, "a") as file:  # a write cut short by a full disk, then the rollback after it
        file.write('{"time": 1, "alias": "produ\n')
    registry.move_alias(v0, "production", reason="rollback")
    assert registry.resolve(COLLECTION, "production") == v0
    registry.log_model(COLLECTION, *tiny_model(2))  # a locked write: recovery runs
    assert registry.resolve(COLLECTION, "production") == v0, "the rollback was undone"
    records = [json.loads(line) for line in log.read_text().splitlines()]  # repaired: every line parses
    assert [(r["version"], r["previous"]) for r in records] == [("v0", None), ("v1", "v0"), ("v0", "v1")]


def test_a_torn_last_line_is_repaired_before_the_next_append(tmp_path):
    registry = LocalRegistry(tmp_path)
    v0, v1 = (registry.log_model(COLLECTION, *tiny_model(seed)) for seed in (0, 1))
    registry.move_alias(v0, "production")
    log = tmp_path / COLLECTION / "promotions.jsonl"
    with open(log, "a") as file:
        file.write('{"time": 2, "alias": "production", "vers')  # no newline: the append was cut
    registry.move_alias(v1, "production")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["version"] for r in records] == ["v0", "v1"]
    assert registry.resolve(COLLECTION, "production") == v1


# --- which trial runs are run again -------------------------------------------------------------

def run_in(state, started: datetime | None = None, name: str = "s-lr0.01-seed0") -> FlowRun:
    return FlowRun(id=uuid4(), name=name, flow_id=uuid4(), state=state, start_time=started)


def test_a_run_that_ended_without_an_outcome_is_run_again_and_one_with_an_outcome_is_not():
    assert ended_without_outcome(run_in(Crashed(message="exited -9"))).startswith("Crashed: exited -9")
    assert "without an outcome" in ended_without_outcome(run_in(Failed(message="ConnectError")))
    verdict = Failed(message="diverged", data={"status": "diverged"}, name=TRIAL_FAILED_STATE)
    assert ended_without_outcome(run_in(verdict)) is None
    # The engine's Failed, with the exception stored as the run's result: not an outcome either.
    engine = Failed(message="Flow run encountered an exception: ConnectError", data={"type": "ConnectError"})
    assert "without an outcome" in ended_without_outcome(run_in(engine))
    assert ended_without_outcome(run_in(Completed(data={}))) is None


def test_a_running_run_without_heartbeats_is_lost_but_not_while_the_server_was_away():
    now = datetime.now(timezone.utc)
    long_ago = now - timedelta(seconds=LOST_AFTER_SECONDS + 5)
    run = run_in(Running(), started=long_ago)
    assert "no heartbeat since it started" in lost_reason(run, None, long_ago, long_ago, now)
    assert "no new heartbeat" in lost_reason(run, long_ago + timedelta(seconds=1), long_ago, long_ago, now)
    assert lost_reason(run, now - timedelta(seconds=5), long_ago, long_ago, now) is None
    # The server was unreachable until a moment ago: no heartbeat could arrive, nothing is lost.
    assert lost_reason(run, long_ago, long_ago, now - timedelta(seconds=10), now) is None
    assert lost_reason(run_in(Completed(), started=long_ago), None, long_ago, long_ago, now) is None
    # Seen Running only a moment ago (its start time, from another machine's clock, is old).
    assert lost_reason(run, None, now - timedelta(seconds=10), long_ago, now) is None


class FakeClient:
    """The few calls the watcher makes, answered from a script of states per flow run (the state
    machine itself is checked against a real server in the slow tests)."""

    def __init__(self, script: dict, down: int = 0):
        self.script, self.down, self.states_set = script, down, []

    def read_flow_run(self, flow_run_id):
        if self.down:
            self.down -= 1
            raise httpx.ConnectError("connection refused")
        states = self.script[flow_run_id]
        run = states[0] if len(states) == 1 else states.pop(0)
        return run

    def read_events(self, filter, limit):
        return type("Page", (), {"events": []})()

    def set_flow_run_state(self, flow_run_id, state, force=False):
        self.states_set.append((flow_run_id, state.type.value))


def test_a_crashed_run_is_resubmitted_up_to_trial_retries_times(monkeypatch):
    """Before: a Crashed trial run was recorded as a failed trial, never run again."""
    monkeypatch.setattr(trial_runs, "TRIAL_POLL_SECONDS", 0)
    first, second, third = (run_in(Crashed(message="exited -9"), name=f"r{n}") for n in range(3))
    script = {first.id: [first], second.id: [second], third.id: [third]}
    queue = [second, third]
    released = []
    trial = TrialRuns(SPEC, [first])
    client = FakeClient(script, down=3)  # and the server away for the first looks
    watcher = TrialRunWatcher(client, [trial], retries=2, deadline=float("inf"),
                              resubmit=lambda spec, attempt: queue.pop(0), release=released.append,
                              log=lambda m: None, warn=lambda m: None)
    watcher.wait()
    assert [run.name for run in trial.runs] == ["r0", "r1", "r2"] and trial.final.name == "r2"
    records = trial.attempt_records()
    assert [r["ended"] for r in records] == ["Crashed", "Crashed", "Crashed"]
    assert trial.gave_up.startswith("Crashed: exited -9")
    outcome = outcome_of_trial(trial, "work pool 'p', queue 'q'")
    assert outcome.status == "failed" and "no retries left (3 attempt(s), trial_retries 2)" in outcome.error
    assert released == [first, second, third]  # each dead run's device slot given back

    completed = run_in(Completed(data={}), name="r1")
    trial = TrialRuns(SPEC, [first])
    watcher = TrialRunWatcher(FakeClient({first.id: [first], completed.id: [completed]}), [trial], retries=2,
                              deadline=float("inf"), resubmit=lambda spec, attempt: completed,
                              release=lambda run: None, log=lambda m: None, warn=lambda m: None)
    watcher.wait()
    assert trial.final is completed and len(trial.attempt_records()) == 2


def test_a_server_that_does_not_answer_is_waited_out():
    """Before: read_flow_run raised once the client's retries were spent and the sweep died."""
    running, done = run_in(Running(), started=datetime.now(timezone.utc)), run_in(Completed(data={}))
    done.id = running.id
    client = FakeClient({running.id: [running, done]}, down=5)
    said = []
    trial = TrialRuns(SPEC, [running])
    watcher = TrialRunWatcher(client, [trial], retries=2, deadline=float("inf"), resubmit=None,
                              release=lambda run: None, log=said.append, warn=said.append)
    for _ in range(7):
        watcher.poll()
    assert trial.final is done
    assert any("unreachable" in line for line in said) and any("answers again" in line for line in said)


def test_at_the_deadline_open_runs_are_cancelled_through_their_workers(monkeypatch):
    """Before: a Cancelled state was forced on the run, so its worker never stopped the process."""
    monkeypatch.setattr(trial_runs, "CANCEL_GRACE_SECONDS", 0.2)
    monkeypatch.setattr(trial_runs, "TRIAL_POLL_SECONDS", 0.05)
    running = run_in(Running(), started=datetime.now(timezone.utc))
    client = FakeClient({running.id: [running]})
    trial = TrialRuns(SPEC, [running])
    TrialRunWatcher(client, [trial], retries=2, deadline=0, resubmit=None, release=lambda run: None,
                    log=lambda m: None, warn=lambda m: None).wait()
    assert [state for _, state in client.states_set] == ["CANCELLING", "CANCELLED"]
    assert "dispatch timeout" in trial.timed_out and trial.attempt_records()[-1]["ended"] == "TIMED_OUT"


def test_the_report_says_how_many_attempts_each_dispatched_trial_took():
    summary = {"trials": [
        {"learning_rate": 0.01, "seed": 0, "attempts": [
            {"name": "s-lr0.01-seed0", "ended": "Crashed", "reason": "Crashed: exited -9"},
            {"name": "s-lr0.01-seed0-attempt2", "ended": "COMPLETED", "reason": None}]},
        {"learning_rate": 0.1, "seed": 0, "attempts": [{"name": "s-lr0.1-seed0", "ended": "COMPLETED", "reason": None}]},
        {"learning_rate": 1.0, "seed": 0, "attempts": []}]}
    assert attempt_lines(summary) == [
        "- lr 0.01, seed 0: 2 attempts, the last COMPLETED (flow run s-lr0.01-seed0-attempt2); re-run after:",
        "  1. s-lr0.01-seed0: Crashed: exited -9",
        "- lr 0.1, seed 0: 1 attempt (flow run s-lr0.1-seed0, COMPLETED)"]


# --- device slots, against the session's real server ----------------------------------------------

def test_a_failed_lease_renewal_does_not_stop_a_training_trial(prefect_server, monkeypatch):
    """Before: the slot was taken with strict=True, so a lease renewal that failed (the server
    away) cancelled the trial in the middle of its training."""
    def server_away(self, lease_id, lease_duration):
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", server_away)
    trained = []
    with worker_device("renewal-node", ["cpu"], 1):
        for _ in range(80):  # 8 s of "training": the three renewal attempts fail within ~4 s
            time.sleep(0.1)
        trained.append(True)
    assert trained == [True]


def test_the_slot_of_a_crashed_run_is_reclaimed_by_the_next_trial(prefect_server):
    """Before: the slot stayed taken until its lease expired (300 s) and every other trial of
    that worker waited for it."""
    devices = ["cpu"]
    names = ensure_device_limits("reclaim-node", devices, 1)

    @flow(name="slot-holder")
    def holder():
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(holder, state=Running())
        lease = take_slot(client, names[0], run.id)
        record_slot(client, run.id, names[0], lease)
        client.set_flow_run_state(run.id, Crashed(message="SIGKILL"), force=True)
    said, taken = [], []
    waiter = threading.Thread(target=lambda: taken.extend(
        _take_device(prefect_server.api_url, "reclaim-node", devices, said)))
    waiter.start()
    waiter.join(timeout=60)
    assert taken == ["cpu"], "the crashed run's slot was not given back"
    assert any("held by a crashed run" in line for line in said)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(names[0])
        assert limit.active_slots == 0 and client.read_variable_by_name(slot_record_name(run.id)) is None


def _take_device(api_url: str, worker: str, devices: list[str], said: list[str]) -> list[str]:
    with temporary_settings({PREFECT_API_URL: api_url}), worker_device(worker, devices, 1, said.append) as device:
        return [device]


# --- a run that was given up on, against the session's real server -------------------------------

def _running_run():
    @flow(name="given-up")
    def given_up():
        pass

    with get_client(sync_client=True) as client:
        return client.create_flow_run(given_up, state=Running())


def _set_crashed(run_id) -> None:
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Crashed(message="LOST: no sign of life for 130 s"), force=True)


def _stopped_within(check, seconds: float) -> TrialSuperseded | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            check()
        except TrialSuperseded as stopped:
            return stopped
        time.sleep(0.05)
    return None


def test_a_run_set_crashed_while_it_trains_is_told_to_stop(prefect_server, monkeypatch):
    """Before: a run the sweep had taken for lost (a network split) and re-run trained on to its
    last epoch when it came back, beside its re-run, on the same trial."""
    monkeypatch.setattr(trial, "STILL_WANTED_SECONDS", 0.2)
    run = _running_run()
    with still_wanted(run.id) as check:
        assert _stopped_within(check, 1.0) is None, "a run still wanted was stopped"
        _set_crashed(run.id)
        stopped = _stopped_within(check, 10.0)
    assert stopped is not None, "the run never heard that it was given up"
    assert "set Crashed while it trained: LOST" in str(stopped)


def test_an_unreachable_server_does_not_stop_a_training_trial(prefect_server, monkeypatch):
    """The server away is no verdict: the trial trains on, and hears once the server is back."""
    monkeypatch.setattr(trial, "STILL_WANTED_SECONDS", 0.2)
    run = _running_run()

    def server_away(self, flow_run_id):
        raise httpx.ConnectError("connection refused")

    with pytest.MonkeyPatch.context() as outage:
        outage.setattr(SyncPrefectClient, "read_flow_run", server_away)
        with still_wanted(run.id) as check:
            assert _stopped_within(check, 1.5) is None, "an outage stopped the trial"
            outage.undo()
            _set_crashed(run.id)
            assert _stopped_within(check, 10.0) is not None, "the watch gave up during the outage"
