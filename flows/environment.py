"""Quiet, local defaults for Prefect and W&B, applied before either is imported (both read their
settings at import). Only variables the user has not set are touched."""

import os

LOCAL_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The temporary local server needs more than the default 20 s to start on a small machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "WANDB_SILENT": "true",
}


def apply_local_defaults(extra: dict[str, str] | None = None) -> None:
    for name, value in (LOCAL_DEFAULTS | (extra or {})).items():
        os.environ.setdefault(name, value)
