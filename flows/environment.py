"""Quiet, local defaults for Prefect, W&B and PyTorch, in one place.

They must be in the environment before Prefect, W&B or torch is imported (each reads its
settings at import), and only variables the user has not set are touched. The CLI applies them
first thing; for anything else (the Prefect CLI, pytest, the benchmarks, the container) run it
through this module:

    python -m flows.environment prefect server start      # = the command, with the defaults
"""

import os
import sys

LOCAL_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The temporary local server needs more than the default 20 s to start on a small machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "WANDB_SILENT": "true",
    # Idle OpenMP threads sleep instead of spinning: processes sharing cores (a server, a worker,
    # a second trial) do not slow each other 3-5x.
    "OMP_WAIT_POLICY": "PASSIVE",
    # A server started here keeps the device slots' leases in files, not in memory: a restarted
    # server still knows which trial holds which slot (in memory, a restart leaked every slot
    # held at that moment until the trials on that worker waited forever).
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
}


def checkout_prefect_home() -> dict[str, str]:
    """Run from a source checkout (`.venv/bin/lr-sweep`), Prefect's state is the checkout's
    `.prefect`, as `make` sets it: one background server per checkout, whichever way it is
    started. An installed package (the Docker image) keeps Prefect's own default."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")) and os.path.isfile(os.path.join(checkout, "Makefile")):
        return {"PREFECT_HOME": os.path.join(checkout, ".prefect")}
    return {}


def apply_local_defaults(extra: dict[str, str] | None = None) -> None:
    for name, value in (LOCAL_DEFAULTS | checkout_prefect_home() | (extra or {})).items():
        os.environ.setdefault(name, value)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m flows.environment COMMAND [ARG ...]")
    apply_local_defaults()
    os.execvp(sys.argv[1], sys.argv[1:])
