"""What `lr-sweep run` does to start fast, checked in fresh processes: the imports with
the garbage collector paused and everything they made frozen, and W&B's service started in the
background before the first trial asks for it."""

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.cli import collector_paused

pytestmark = pytest.mark.slow  # fresh interpreters: seconds each


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_sweep_modules_load_with_the_collector_paused_and_it_is_back_on_after():
    out = run_python("""
        import gc, sys
        from flows.cli import collector_paused
        with collector_paused("flows.sweep"):
            enabled_during = gc.isenabled()
            import flows.sweep
        print(enabled_during, gc.isenabled(), gc.get_freeze_count(), "torch._dynamo" in sys.modules)
    """).split()
    assert out[:2] == ["False", "True"]  # paused while loading, collecting again afterwards
    assert int(out[2]) > 100_000  # what torch, Prefect and W&B made is frozen, never scanned again
    assert out[3] == "True"  # loaded with the rest, not at the first trial's optimizer


def test_a_process_that_has_loaded_the_modules_keeps_its_collector_as_it_is():
    import flows.sweep  # noqa: F401  (as in this test process: loaded already)

    frozen = gc.get_freeze_count()
    with collector_paused("flows.sweep"):
        assert gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_w_and_b_service_starts_in_the_background_and_not_when_disabled():
    out = run_python("""
        import os, threading
        from tasks.reporting import tracking

        def services():  # this process's children running wandb-core
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    parent = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
                    command = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:  # gone meanwhile
                    continue
                if int(parent) == os.getpid() and b"wandb-core" in command:
                    found.append(pid)
            return found

        tracking.start_service_in_background("disabled")
        print(len([t for t in threading.enumerate() if t.name == "wandb-service-start"]), len(services()))
        tracking.start_service_in_background("offline")
        [starting] = [t for t in threading.enumerate() if t.name == "wandb-service-start"]
        starting.join(60)
        print(len(services()))
    """).split()
    assert out == ["0", "0", "1"]


def test_the_checkouts_lr_sweep_and_make_share_one_prefect_home():
    """`make` exports PREFECT_HOME=CHECKOUT/.prefect; `.venv/bin/lr-sweep` used ~/.prefect, so each
    started a background server of its own."""
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    shown = subprocess.run([sys.executable, "-c", "import os; from flows.environment import apply_local_defaults; "
                            "apply_local_defaults(); print(os.environ['PREFECT_HOME'])"],
                           env=environment, capture_output=True, text=True, cwd="/", check=True).stdout.strip()
    assert shown == str(Path(__file__).resolve().parent.parent / ".prefect")
