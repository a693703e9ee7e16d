"""A real Prefect server with workers, for the end-to-end tests: processes started in sessions
of their own (stopping one stops its children) and stopped by id at the end, pass or fail."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker

from tests.conftest import REPO_ROOT

BIN = Path(sys.executable).parent
SERVER_START_SECONDS = 240  # a 2-core machine shared with other test runs is slow to start it


def flush_prefect_workers(timeout: float = 10) -> None:
    """Send this process's queued Prefect events and logs now, and stop their workers.

    Call it while the server they were for still runs, before a test points the process at
    another one: a worker binds to the API of its first item, and its instance key omits the
    URL, so it would carry a later server's events to this one once it is stopped (the slow
    session then spent ~50 s at exit retrying them into a closed stderr)."""
    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Stack:
    env: dict
    api_url: str
    home: Path
    processes: list

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """A long-running process in its own session, so that stopping it stops its children."""
        log = open(self.home / f"{name}.log", "a")
        process = subprocess.Popen(args, env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((name, process))
        return process

    def run(self, *args: str, timeout: float = 180) -> str:
        result = subprocess.run(args, env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def make(self, *targets: str) -> str:
        # -o: the venv is given; do not let make reinstall it.
        return self.run("make", "-s", "-o", ".venv/.installed", *targets)

    def worker(self, name: str, queue: str, limit: int) -> None:
        self.start(name, str(BIN / "prefect"), "worker", "start", "--pool", "lr-sweep-process",
                   "--work-queue", queue, "--name", name, "--limit", str(limit))

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10) -> None:
        """Stop one process (its whole session) by the name it was started under; one that has
        not exited `grace` seconds after `sig` is killed. It never raises: it runs in `finally`
        blocks, where an error of its own would hide the test's. (Prefect's process worker
        often takes over a minute to honour SIGTERM, its event loop idle and no flow run left:
        the tests stop workers once their trials are over, and lose nothing by killing them.)"""
        for started, process in self.processes:
            if started == name and process.poll() is None:
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    print(f"{name} (pid {process.pid}) did not stop {grace:.0f} s after signal {sig}; killed")
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()

    def start_server(self) -> subprocess.Popen:
        """`prefect server start` on the stack's port and database (again, after a stop)."""
        port = self.api_url.rsplit(":", 1)[1].split("/")[0]
        self.processes = [(name, process) for name, process in self.processes if name != "server"]
        server = self.start("server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                            "--port", port)
        wait_until_healthy(self, server)
        return server

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text()

    def client(self):
        return get_client(sync_client=True)

    def api(self, path: str, body: dict) -> object:
        request = urllib.request.Request(f"{self.api_url}{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop_all(self) -> None:
        flush_prefect_workers()  # what this process sent to the stack's server, while it runs
        for _, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_until_healthy(stack: Stack, server: subprocess.Popen) -> float:
    """Seconds until the server answered; fails with its log if it exits or never answers."""
    started = time.monotonic()
    while time.monotonic() - started < SERVER_START_SECONDS:
        assert server.poll() is None, f"prefect server exited:\n{stack.log('server')}"
        try:
            with urllib.request.urlopen(f"{stack.api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {SERVER_START_SECONDS} s:\n{stack.log('server')}")




@contextlib.contextmanager
def deployed_stack(home: Path):
    """A Prefect server on a free port with its own SQLite database in `home`, the pools and the
    local deployments (`make pools`, `make deploy-local`) and a worker for sweeps on the default
    queue; every process stopped at the end, pass or fail."""
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LR_SWEEP_")}
    env.update({
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'server.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # workers notice new runs quickly
        "PREFECT_LOGGING_LEVEL": "INFO",
    })
    stack = Stack(env=env, api_url=api_url, home=home, processes=[])
    try:
        stack.start_server()
        stack.make("pools")
        stack.make("deploy-local")
        stack.worker("sweep-worker", queue="default", limit=2)
        yield stack
    finally:
        stack.stop_all()
