"""The background server's record is only a claim: `lr-sweep run` and `lr-sweep server stop`
signal a process only while it is provably the Prefect server that was started (its boot, start
time and command line match the record). Real processes, no Prefect server."""

import json
import os
import subprocess

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
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        server = local_server.LocalServer(url="http://127.0.0.1:9", pid=process.pid, log="",
                                          identity=local_server.process_identity(process.pid))
        assert server.identity["command"] == ["sleep", "300"] and server.is_running()
        write_record(tmp_path, **server.__dict__)
        assert local_server.recorded(tmp_path) == server
        local_server.stop(server)
        process.wait(timeout=10)  # stopped (and reaped by stop(): no returncode to read here)
        assert not server.is_running() and local_server.recorded(tmp_path) is None
    finally:
        process.kill()
        process.wait()


def test_a_record_that_is_not_json_is_discarded(tmp_path, capsys):
    (tmp_path / local_server.STATE_FILE).write_text("{")
    assert local_server.recorded(tmp_path) is None and "unreadable" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
