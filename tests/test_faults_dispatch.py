"""Dispatched trials that survive their machines, on a real Prefect server with real process
workers: a trial's flow-run process SIGKILLed while training, a worker SIGKILLed with its trial
(a machine that is gone), a worker and its trial frozen and thawed (a network split), and the
server stopped for two minutes and started again. Each sweep must end with every trial completed
and the alias on the best model.

The sweep runs in this process (so the time after which a silent run counts as lost can be
shortened); its trials run on process workers started with `prefect worker start`, as a user
starts them. Every process started here is stopped by its id at the end.
"""

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from flows import trial_runs
from flows.sweep import SweepFailed, lr_sweep
from flows.trial import SLOT_RECORD_PREFIX, device_limit_name
from flows.trial_runs import last_heartbeat
from models.local_registry import LocalRegistry
from tests.conftest import make_idx_dataset
from tests.helpers import COLLECTION, smoke_config, wait_for
from tests.stack import deployed_stack

pytestmark = pytest.mark.slow

# Two heartbeats (30 s apart) missed and a few seconds more: enough to tell a gone worker from a
# slow one here, and a test that waits a minute instead of two.
LOST_AFTER_SECONDS = 65
OUTAGE_SECONDS = 120


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with deployed_stack(tmp_path_factory.mktemp("prefect-faults")) as stack:
        yield stack


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Synthetic images enough for an epoch of a few seconds: a trial can be killed mid-training."""
    directory = tmp_path_factory.mktemp("faults-data")
    make_idx_dataset(directory / "MNIST" / "raw", train=8000, test=300)
    return directory


def sweep_config(stack, data_dir, name: str, **overrides):
    values = dict(learning_rates=[0.003, 0.001], epochs=3, val_size=500, sweep_id=name, dispatch="deployment",
                  trial_deployment="lr-sweep-trial/trial-local", dispatch_timeout_minutes=15)
    return smoke_config(stack.home / name, data_dir, **(values | overrides))


class SweepInThread:
    """The sweep, run in a thread of this process against the stack's server; its summary (or
    error) once it ends."""

    def __init__(self, stack, config):
        self.config, self.result, self.error = config, None, None
        storage = Path(stack.env["PREFECT_HOME"]) / "storage"  # the workers' result storage

        def run():
            with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
                try:
                    self.result = lr_sweep(config=config)
                except BaseException as error:
                    self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def summary(self, timeout: float) -> dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the sweep did not end; it is at:\n{self.stack()}"
        assert self.error is None, f"the sweep failed: {self.error!r}"
        return self.result

    def stack(self) -> str:
        """Where the sweep's thread is now, and every other thread of this process (where it waits)."""
        return "\n".join(f"--- thread {thread.name}{' (the sweep)' if thread is self.thread else ''}:\n"
                         + "".join(traceback.format_stack(sys._current_frames()[thread.ident]))
                         for thread in threading.enumerate() if thread.ident in sys._current_frames())


def flow_run_processes(flow_run_ids: set[str]) -> dict[str, int]:
    """PID of the engine process executing each of these flow runs (`python -m prefect.engine`,
    its environment naming the run; its children, such as W&B's service, name it too)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prefect.engine" not in command:
            continue
        for variable in environ:
            if variable.startswith(b"PREFECT__FLOW_RUN_ID="):
                run_id = variable.split(b"=", 1)[1].decode()
                if run_id in flow_run_ids:
                    found[run_id] = int(entry.name)
    return found


def running(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (exited, not yet reaped by its worker) does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sweep_runs(stack, sweep_id: str) -> list:
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"sweep:{sweep_id}"])))


def checkpoints(config) -> list[Path]:
    return list((Path(config.output_dir) / "checkpoints").glob("*/checkpoint.safetensors"))


def training_run(stack, config, log: Path) -> tuple[str, int]:
    """(flow run id, pid) of the dispatched run that is training now: it holds the device slot
    and has written its checkpoint of epoch 1."""
    wait_for(lambda: checkpoints(config), 300, "a trial's first checkpoint", log)
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        holders = [v.name.removeprefix(SLOT_RECORD_PREFIX) for v in client.read_variables()
                   if v.name.startswith(SLOT_RECORD_PREFIX)]
    runs = {str(run.id) for run in sweep_runs(stack, config.sweep_id)}
    training = [run_id for run_id in holders if run_id in runs]
    assert len(training) == 1, f"slot holders {holders}, runs {runs}"
    processes = flow_run_processes(set(training))
    assert processes, f"no process found for the training run {training[0]}"
    return training[0], processes[training[0]]


@contextlib.contextmanager
def sweep_training_on(stack, data_dir, worker: str, name: str, limit: int = 2, **overrides):
    """A process worker `worker` on the trials' queue and sweep `name` in a thread, yielded as
    (config, sweep, (flow run id, pid) of the trial training now) once a trial trains; the worker
    is stopped at the end, pass or fail."""
    stack.worker(worker, queue="trials", limit=limit)
    config = sweep_config(stack, data_dir, name, **overrides)
    sweep = SweepInThread(stack, config)
    try:
        yield config, sweep, training_run(stack, config, stack.home / f"{worker}.log")
    finally:
        stack.stop(worker)


def assert_every_trial_completed_and_the_alias_on_the_best(config, summary: dict) -> None:
    assert [t["status"] for t in summary["trials"]] == ["completed"] * len(config.learning_rates), summary["trials"]
    best = max(summary["trials"], key=lambda t: t["evaluation"]["val_accuracy"])
    holder = LocalRegistry(config.registry_dir).resolve(COLLECTION, "production")
    assert str(holder) == summary["best"]["model"] == best["model"]
    on_disk = json.loads((Path(config.output_dir) / config.sweep_id / "summary.json").read_text())
    assert [len(t["attempts"]) for t in on_disk["trials"]] == [len(t["attempts"]) for t in summary["trials"]]


def test_a_sigkilled_trial_is_run_again_from_its_checkpoint_and_frees_its_slot(stack, data_dir):
    """Before: the killed trial was recorded as failed, and the other trial of that worker waited
    for the dead trial's device slot until its lease expired (300 s)."""
    # Both trials start on the worker (limit 2); one holds its one CPU slot.
    with sweep_training_on(stack, data_dir, "kill-worker", "faults-kill") as (config, sweep, (victim, pid)):
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        summary = sweep.summary(timeout=600)
        ended = time.monotonic()
    assert_every_trial_completed_and_the_alias_on_the_best(config, summary)
    by_run = {t["attempts"][0]["flow_run"]: t for t in summary["trials"]}
    killed = by_run[victim]
    assert len(killed["attempts"]) == 2 and killed["attempts"][0]["ended"] == "Crashed", killed["attempts"]
    assert killed["resumed_from"] >= 1, "the re-run did not resume from the checkpoint"
    other = next(t for t in summary["trials"] if t is not killed)
    assert len(other["attempts"]) == 1
    assert ended - killed_at < 240, "a trial waited for the killed trial's slot until its lease expired"
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(device_limit_name("kill-worker", "cpu"))
        # The trial runs send heartbeats (what tells a lost run from a live one).
        survivor = client.read_flow_run(other["attempts"][0]["flow_run"])
        beat = last_heartbeat(client, survivor, survivor.start_time - timedelta(minutes=1))
    assert limit.active_slots == 0
    assert beat is not None and survivor.start_time <= beat <= survivor.end_time
    report = (Path(config.output_dir) / config.sweep_id / "report.md").read_text()
    assert "## Trial runs" in report and "2 attempts" in report


def test_a_trial_whose_worker_vanished_is_run_again_elsewhere(stack, data_dir, monkeypatch):
    """Before: its run stayed Running until the dispatch timeout, and the trial was failed."""
    monkeypatch.setattr(trial_runs, "LOST_AFTER_SECONDS", LOST_AFTER_SECONDS)
    with sweep_training_on(stack, data_dir, "doomed-worker", "faults-worker") as (config, sweep, _):
        stack.stop("doomed-worker", signal.SIGKILL)  # the machine is gone: worker and trials
        for pid in flow_run_processes({str(run.id) for run in sweep_runs(stack, config.sweep_id)}).values():
            os.kill(pid, signal.SIGKILL)
        stack.worker("rescue-worker", queue="trials", limit=2)
        try:
            summary = sweep.summary(timeout=900)
        finally:
            stack.stop("rescue-worker")
    assert_every_trial_completed_and_the_alias_on_the_best(config, summary)
    lost = [t for t in summary["trials"] if len(t["attempts"]) > 1]
    assert lost and all(t["attempts"][0]["ended"] == "LOST" for t in lost), summary["trials"]
    assert {t["worker"] for t in summary["trials"]} == {"rescue-worker"}


def test_a_server_stopped_for_two_minutes_is_ridden_out(stack, data_dir, monkeypatch):
    """Before: read_flow_run raised once the client's retries were spent (about a minute), and
    the sweep died with its trials still running."""
    monkeypatch.setattr(trial_runs, "LOST_AFTER_SECONDS", LOST_AFTER_SECONDS)
    with sweep_training_on(stack, data_dir, "outage-worker", "faults-outage") as (config, sweep, _):
        stack.stop("server")
        time.sleep(OUTAGE_SECONDS)
        assert sweep.thread.is_alive() and sweep.error is None, f"the sweep died: {sweep.error!r}"
        stack.start_server()
        summary = sweep.summary(timeout=900)
    assert_every_trial_completed_and_the_alias_on_the_best(config, summary)


def test_a_lost_run_that_comes_back_stops_at_its_next_epoch(stack, data_dir, monkeypatch):
    """A network split, played by freezing a worker and its trial's process (SIGSTOP): the sweep
    takes the run for lost and re-runs it on another worker; then the split heals (SIGCONT).
    Before: the run that came back trained on to its last epoch beside its re-run, and the re-run
    reused the model it stored."""
    monkeypatch.setattr(trial_runs, "LOST_AFTER_SECONDS", LOST_AFTER_SECONDS)
    # Epochs enough that training on to the last one takes far longer than the watch's 10 s.
    with sweep_training_on(stack, data_dir, "split-worker", "faults-split", limit=1, learning_rates=[0.003],
                           epochs=30) as (config, sweep, (old_run, pid)):
        worker = next(process.pid for name, process in stack.processes if name == "split-worker")

        def signal_split(sig: int) -> None:
            os.killpg(worker, sig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

        def re_run_running() -> bool:
            time.sleep(1)  # one query a second
            return any(str(run.id) != old_run and run.state_type.value == "RUNNING"
                       for run in sweep_runs(stack, config.sweep_id))

        signal_split(signal.SIGSTOP)
        stack.worker("split-rescue", queue="trials", limit=1)
        try:
            wait_for(re_run_running, 300, "the re-run of the lost trial", stack.home / "split-rescue.log")
            signal_split(signal.SIGCONT)
            back = time.monotonic()
            wait_for(lambda: not running(pid), 120, "the run that came back to stop", stack.home / "split-worker.log")
            stopped_after = time.monotonic() - back
            summary = sweep.summary(timeout=600)
        finally:
            signal_split(signal.SIGCONT)
            stack.stop("split-rescue")
    print(f"the run that came back stopped {stopped_after:.1f} s after SIGCONT")
    assert stopped_after < 20, f"the run that came back trained on for {stopped_after:.0f} s"
    assert_every_trial_completed_and_the_alias_on_the_best(config, summary)
    attempts = summary["trials"][0]["attempts"]
    assert len(attempts) == 2 and attempts[0]["ended"] == "LOST", attempts
    resumed_from = summary["trials"][0]["resumed_from"]
    assert resumed_from is not None and 1 <= resumed_from < config.epochs, \
        f"the re-run did not resume from the checkpoint (resumed_from {resumed_from})"
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        state = client.read_flow_run(old_run).state
    assert state.name == "Superseded" and "set Crashed while it trained: LOST" in state.message, state


def test_at_the_deadline_a_running_trial_is_stopped_by_its_worker(stack, data_dir):
    """Before: the sweep forced a Cancelled state on the run and its process trained on."""
    with sweep_training_on(stack, data_dir, "deadline-worker", "faults-deadline", limit=1, learning_rates=[0.003],
                           epochs=200, dispatch_timeout_minutes=1.0) as (config, sweep, (run_id, pid)):
        sweep.thread.join(timeout=300)
        assert isinstance(sweep.error, SweepFailed), f"the sweep ended with {sweep.error!r}"
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, "the trial's process to stop",
                 stack.home / "deadline-worker.log")
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state.type.value == "CANCELLED" and "no worker stopped it" not in (state.message or ""), state
    summary = json.loads((Path(config.output_dir) / config.sweep_id / "summary.json").read_text())
    assert summary["trials"][0]["attempts"][-1]["ended"] == "TIMED_OUT"
    assert "did not finish within the dispatch timeout: it was still Running" in summary["trials"][0]["error"]
