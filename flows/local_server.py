"""A Prefect server that outlives one `lr-sweep run`, started on demand and reused.

Without PREFECT_API_URL, Prefect starts a temporary server inside every run (10-20 s on a
2-core machine) and stops it at the end: each sweep pays the start, and nobody can open the UI
afterwards. Instead, `lr-sweep run` starts `prefect server start` once, in the background, on a
free local port with its SQLite database in PREFECT_HOME, records it in
PREFECT_HOME/lr-sweep-server.json, and every later run in that PREFECT_HOME reuses it: the UI at
its address shows every sweep. `lr-sweep server stop` stops it; `lr-sweep run --temporary-server`
keeps Prefect's own behaviour. A server someone set with PREFECT_API_URL always wins.
"""

from __future__ import annotations

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

from flows.environment import LOCAL_DEFAULTS
from models.files import atomic_write, file_lock

STATE_FILE = "lr-sweep-server.json"
HOST = "127.0.0.1"
# `prefect server start` with a fresh database takes 10-20 s on 2 cores (migrations); an
# existing one 6-10 s. Past this the start counts as failed and its log is shown.
START_TIMEOUT_SECONDS = 180.0


class ServerError(RuntimeError):
    """The background server could not be started; the message holds the end of its log."""


@dataclass(frozen=True)
class LocalServer:
    url: str  # the UI; the API is url + "/api"
    pid: int
    log: str

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def recorded(home: Path) -> LocalServer | None:
    """The server recorded in `home` while its process runs (it may still be starting)."""
    try:
        server = LocalServer(**json.loads((home / STATE_FILE).read_text()))
        os.kill(server.pid, 0)
    except (OSError, ValueError, TypeError):
        return None
    return server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def launch(home: Path) -> LocalServer:
    """Start `prefect server start` in a session of its own (it outlives this process)."""
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{free_port()}"
    log = home / "lr-sweep-server.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", url.rsplit(":", 1)[1]],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            # The UI calls the API at PREFECT_SERVER_UI_API_URL, which otherwise stays at port 4200.
            env=LOCAL_DEFAULTS | os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_UI_API_URL": f"{url}/api"})
    return LocalServer(url=url, pid=process.pid, log=str(log))


def wait_until_healthy(server: LocalServer, timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not is_healthy(server.url, timeout=1.0):
        if is_gone(server.pid):
            raise ServerError(f"the Prefect server exited while starting; its log ({server.log}):\n"
                              f"{Path(server.log).read_text()[-2000:]}")
        if time.monotonic() > deadline:
            stop(server)
            raise ServerError(f"the Prefect server did not answer within {timeout:.0f} s; its log "
                              f"({server.log}):\n{Path(server.log).read_text()[-2000:]}")
        time.sleep(0.2)


def ensure_started(home: Path) -> tuple[LocalServer, bool]:
    """The recorded server, or a new one (launched, not yet waited for); True when it is new.

    Under a lock: two sweeps started at once share one server."""
    with file_lock(home, ".lr-sweep-server.lock"):
        if (server := recorded(home)) is not None:
            return server, False
        server = launch(home)
        atomic_write(home / STATE_FILE, json.dumps(server.__dict__))
        return server, True


def is_gone(pid: int) -> bool:
    """True once the process has exited (reaped here when it is this process's child: an unreaped
    child still answers kill(pid, 0))."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    return False


def stop(server: LocalServer) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if is_gone(server.pid):
            return
        time.sleep(0.1)
    os.killpg(server.pid, signal.SIGKILL)


def stop_recorded(home: Path) -> LocalServer | None:
    """Stop the server recorded in `home`; returns it, or None when none runs."""
    with file_lock(home, ".lr-sweep-server.lock"):
        server = recorded(home)
        if server is not None:
            stop(server)
        (home / STATE_FILE).unlink(missing_ok=True)
    return server
