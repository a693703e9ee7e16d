"""The background server's record is only a claim: `lr-sweep run` and `lr-sweep server stop`
signal a process only while it is provably the Prefect server that was started (its boot, start
time and command line match the record). Real processes, no Prefect server."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flows import local_server
from flows.cli import main


@pytest.fixture
def unrelated(tmp_path):
    """An unrelated process in a session of its own, as a reboot or a crash leaves a PID behind."""
    process = subprocess.Popen(["setsid", "sleep", "300"])
    yield process
    process.kill()
    process.wait()


def write_record(home, **fields):
    home.mkdir(parents=True, exist_ok=True)
    (home / local_server.STATE_FILE).write_text(json.dumps(fields))


@pytest.mark.parametrize("identity", ["absent (a record of before the check)", "of another process"])
def test_a_stale_record_never_stops_the_process_it_names(tmp_path, unrelated, monkeypatch, capsys, identity):
    """Reproduced in issue 20: a record left by a crash named the PID of an unrelated `setsid
    sleep`; `lr-sweep server stop` killed its process group."""
    home = tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    claimed = {} if identity.startswith("absent") else {"identity": local_server.process_identity(unrelated.pid) | {
        "command": ["python", "-m", "prefect", "server", "start"]}}
    write_record(home, url="http://127.0.0.1:9", pid=unrelated.pid, log=str(home / "log"), **claimed)
    assert main(["server", "stop"]) == 0
    assert unrelated.poll() is None  # still running
    captured = capsys.readouterr()
    assert "discarding the stale Prefect server record" in captured.err and "left alone" in captured.err
    assert "no lr-sweep server runs" in captured.out
    assert unrelated.poll() is None  # still running
    assert not (home / local_server.STATE_FILE).exists()


def test_run_does_not_reuse_or_wait_on_a_stale_record(tmp_path, unrelated, capsys):
    """`lr-sweep run` took such a record for its server, waited 180 s for it to answer, then
    killed the process group it named."""
    home = tmp_path / "prefect"
    write_record(home, url="http://127.0.0.1:9", pid=unrelated.pid, log=str(home / "log"))
    assert local_server.recorded(home) is None  # what ensure_started asks before it launches one
    assert "discarding" in capsys.readouterr().err
    local_server.stop(local_server.LocalServer(url="http://127.0.0.1:9", pid=unrelated.pid, log=""))
    assert unrelated.poll() is None


def test_the_record_of_a_started_process_proves_it(tmp_path):
    pid, identity = local_server.start_detached(["sleep", "300"], tmp_path / "log", dict(os.environ))
    try:
        server = local_server.LocalServer(url="http://127.0.0.1:9", pid=pid, log="", identity=identity)
        assert server.identity["command"] == ["sleep", "300"] and server.is_running()
        write_record(tmp_path, **server.__dict__)
        assert local_server.recorded(tmp_path) == server
        local_server.stop(server)
        assert local_server.is_gone(pid)  # stopped and reaped by stop()
        assert not server.is_running() and local_server.recorded(tmp_path) is None
    finally:
        kill_and_reap(pid)


def test_every_started_process_is_recorded_with_its_command_line(tmp_path):
    """Issue 29: /proc/PID/cmdline read empty for a few ms after Popen returned (48 of 500
    starts; 1 to 10 of 1,000 here, with the load), and a server recorded then was later judged another process,
    orphaned, and a second one started. The record waits for the command line."""
    empty = 0
    for _ in range(3000):
        pid, identity = local_server.start_detached(["sleep", "300"], tmp_path / "log", dict(os.environ))
        empty += identity is None or identity["command"] != ["sleep", "300"]
        kill_and_reap(pid)
    assert empty == 0


def test_a_process_without_a_command_line_is_never_recorded_as_proven(tmp_path):
    """The same window, made to last: an exited, unreaped child (a zombie) has a stat line and an
    empty command line, as a child in the middle of exec has. Its identity is not taken."""
    process = subprocess.Popen(["true"])
    try:
        while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        assert local_server.process_identity(process.pid)["command"] == []
        assert local_server.started_identity(process.pid, timeout=0.05) is None
    finally:
        process.wait()


def kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_a_record_that_is_not_json_is_discarded(tmp_path, capsys):
    (tmp_path / local_server.STATE_FILE).write_text("{")
    assert local_server.recorded(tmp_path) is None and "unreadable" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
