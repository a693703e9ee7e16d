"""A Prefect server that outlives one `lr-sweep run`, started on demand and reused.

Without PREFECT_API_URL, Prefect starts a temporary server inside every run (10-20 s on a
2-core machine) and stops it at the end: each sweep pays the start, and nobody can open the UI
afterwards. Instead, `lr-sweep run` starts `prefect server start` once, in the background, on a
free local port with its SQLite database in PREFECT_HOME, records it in
PREFECT_HOME/lr-sweep-server.json, and every later run in that PREFECT_HOME reuses it: the UI at
its address shows every sweep. `lr-sweep server stop` stops it; `lr-sweep run --temporary-server`
keeps Prefect's own behaviour. A server someone set with PREFECT_API_URL always wins.

The record is only a claim: after a crash or a reboot its PID may belong to any process. So it
also holds the process's identity (the boot, the start time and the command line, from /proc),
and a process is reused or signalled only while all three still match; a record that does not
match is discarded with a message and the process it names is left alone.
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
# Popen returns when exec closes its error pipe, before the kernel has set up the new program's
# arguments: /proc/PID/cmdline reads empty for a few milliseconds (48 of 500 starts). A record
# taken then would later be judged another process. Seconds to wait for it; it takes ~ms.
COMMAND_LINE_WAIT_SECONDS = 5.0


class ServerError(RuntimeError):
    """The background server could not be started; the message holds the end of its log."""


@dataclass(frozen=True)
class LocalServer:
    url: str  # the UI; the API is url + "/api"
    pid: int
    log: str
    identity: dict | None = None  # process_identity(pid) when it was started

    def is_running(self) -> bool:
        """True while the process `pid` is provably the one started for this record."""
        return self.identity is not None and process_identity(self.pid) == self.identity

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


def process_identity(pid: int) -> dict | None:
    """What tells process `pid` apart from any later process with the same PID: the boot it runs
    in, its start time (clock ticks since that boot) and its command line. None when the process
    is gone or the system has no /proc (then nothing can be proved, and nothing is signalled)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # The fields after the command name, which is in parentheses and may hold spaces: the
    # 22nd field of the line, starttime, is the 20th after it.
    started = stat[stat.rindex(")") + 2:].split()[19]
    return {"boot_id": boot, "start_ticks": started,
            "command": [part.decode(errors="replace") for part in command if part]}


def recorded(home: Path, say=None) -> LocalServer | None:
    """The server recorded in `home` while it runs (it may still be starting). A record whose
    process is gone or is another process is discarded, with a message to `say` (stderr)."""
    path = home / STATE_FILE
    try:
        data = json.loads(path.read_text())
        server = LocalServer(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        return _discard(path, f"unreadable ({error})", say)
    if server.is_running():
        return server
    if process_identity(server.pid) is None:
        why = f"its process (pid {server.pid}) is gone"
    else:
        why = (f"pid {server.pid} is now another process, not the server that was started (its start time "
               "or command line differ, or the record predates the check); that process is left alone")
    return _discard(path, why, say)


def _discard(path: Path, why: str, say) -> None:
    (say or _stderr)(f"lr-sweep: discarding the stale Prefect server record {path}: {why}")
    path.unlink(missing_ok=True)
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def launch(home: Path) -> LocalServer:
    """Start `prefect server start` in a session of its own (it outlives this process)."""
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{free_port()}"
    log = home / "lr-sweep-server.log"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", url.rsplit(":", 1)[1]]
    # The UI calls the API at PREFECT_SERVER_UI_API_URL, which otherwise stays at port 4200.
    env = LOCAL_DEFAULTS | os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_UI_API_URL": f"{url}/api"}
    pid, identity = start_detached(command, log, env)
    return LocalServer(url=url, pid=pid, log=str(log), identity=identity)


def start_detached(command: list[str], log: Path, env: dict) -> tuple[int, dict | None]:
    """Start `command` in a session of its own, its output appended to `log`; its PID and its
    identity once /proc shows its command line."""
    with open(log, "ab") as output:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    return process.pid, started_identity(process.pid)


def started_identity(pid: int, timeout: float = COMMAND_LINE_WAIT_SECONDS) -> dict | None:
    """process_identity(pid) of a process just started, once its command line is readable (see
    COMMAND_LINE_WAIT_SECONDS); None when it is gone, or still has none after `timeout`."""
    deadline = time.monotonic() + timeout
    while (identity := process_identity(pid)) is not None and not identity["command"]:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)
    return identity


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
    """Stop the server's process group, only while its process is provably the one recorded
    (checked again before the SIGKILL: the PID may have been reused meanwhile)."""
    if not server.is_running():
        return
    try:
        if os.getpgid(server.pid) != server.pid:  # it leads its own session and group (launch)
            return
        os.killpg(server.pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if is_gone(server.pid):
            return
        time.sleep(0.1)
    if server.is_running():
        os.killpg(server.pid, signal.SIGKILL)


def stop_recorded(home: Path) -> LocalServer | None:
    """Stop the server recorded in `home`; returns it, or None when none runs (a stale record is
    discarded without signalling anything)."""
    with file_lock(home, ".lr-sweep-server.lock"):
        server = recorded(home)
        if server is not None:
            stop(server)
        (home / STATE_FILE).unlink(missing_ok=True)
    return server
