"""The W&B run wrapper: one run per trial, logged through the run object (tasks run in threads).

Modes: `offline` (default; runs land under the sweep's output directory and can be uploaded later
with `wandb sync`), `online` (needs WANDB_API_KEY), `disabled` (a no-op run, for tests that do
not care). Every W&B folder (runs, artifact staging, cache, config) points under the output
directory, so a sweep leaves nothing in the user's home directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import wandb
from wandb.errors import CommError

from models.wandb_registry import API_TIMEOUT_SECONDS, model_artifact

# How long wandb.init may wait for the W&B server before it gives up with an error, instead of
# its default 90 seconds of silence.
INIT_TIMEOUT_SECONDS = 30
# W&B's command line, run by the interpreter that runs us: the `wandb` script is not always
# installed beside it (system Python in the image puts scripts elsewhere).
WANDB_COMMAND = [sys.executable, "-m", "wandb"]
# The job type of a trial's run; the W&B report selects the sweep's trials by it (an LR range
# test's runs share the sweep's group but log no epochs).
TRAIN_JOB_TYPE = "train"


class WandbUnavailable(RuntimeError):
    """Online W&B was asked for but cannot be used: no API key, or the server does not answer."""


def wandb_server() -> str:
    """The W&B server this process talks to (WANDB_BASE_URL or the SDK's default)."""
    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def require_online_access(project: str, entity: str | None) -> None:
    """Fail early (in at most the API timeout, 30 s), before any training, when online W&B cannot be used.

    Needs WANDB_API_KEY (a key stored by `wandb login` is not enough: online must be chosen
    explicitly, with a key in the environment) and a server that accepts it.
    """
    if not os.environ.get("WANDB_API_KEY"):
        raise WandbUnavailable("W&B online mode needs WANDB_API_KEY; set it, or run with "
                               "--wandb-mode offline and `lr-sweep publish SWEEP_ID` later")
    try:
        # Creating the API client checks the key with the server, bounded by the timeout.
        api = wandb.Api(overrides={"project": project} | ({"entity": entity} if entity else {}),
                        timeout=API_TIMEOUT_SECONDS)
        api.default_entity  # noqa: B018 - one round trip that needs a valid key
    except CommError as error:
        raise WandbUnavailable(f"W&B server {wandb_server()} cannot be used: {error.message.rstrip('.')}; check "
                               "WANDB_API_KEY and WANDB_BASE_URL, or run with --wandb-mode offline "
                               "and publish later") from error


def point_wandb_dirs(output_dir: Path) -> None:
    """Send W&B's caches and staging areas under `output_dir` unless the user chose otherwise.

    These are process-wide environment variables, set once per sweep before any run starts.
    """
    base = Path(output_dir).resolve() / ".wandb"
    for variable, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                          ("WANDB_ARTIFACT_DIR", "artifacts"), ("WANDB_CONFIG_DIR", "config")):
        if not os.environ.get(variable):
            os.environ[variable] = str(base / sub)
            (base / sub).mkdir(parents=True, exist_ok=True)


def start_service_in_background(mode: str) -> None:
    """Start W&B's service process (wandb-core) in a thread, while the sweep prepares its data:
    otherwise the first trial's `wandb.init` waits for it (0.2-0.7 s on 2 cores). `wandb.init`
    takes the same lock, so a start still under way is waited for, never doubled; a start that
    fails here is tried again, and reported, by that `wandb.init`."""
    if mode == "disabled":
        return

    def start() -> None:
        with contextlib.suppress(Exception):
            wandb.setup()

    threading.Thread(target=start, name="wandb-service-start", daemon=True).start()


def start_run(settings, *, group: str, name: str, config: dict, run_dir: Path, job_type: str = TRAIN_JOB_TYPE):
    """A W&B run in `settings` (a TrackingSettings: mode, project, entity)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(
            mode=settings.mode, project=settings.project, entity=settings.entity, group=group, name=name,
            job_type=job_type,
            config=config, dir=str(run_dir), reinit="create_new",
            settings=wandb.Settings(init_timeout=INIT_TIMEOUT_SECONDS, console="off"),
        )
    except CommError as error:
        raise WandbUnavailable(f"W&B run {name!r} could not start on {wandb_server()} within "
                               f"{INIT_TIMEOUT_SECONDS} s: {error.message.rstrip('.')}") from error


@contextlib.contextmanager
def trial_run(settings, *, group: str, name: str, config: dict, run_dir: Path, job_type: str = TRAIN_JOB_TYPE):
    """One trial's W&B run, always finished: with exit code 1 and the error in its summary when
    anything in the block raises (training, storing the model, logging the artifact).

    The error's `status` attribute, when it has one (a diverged trial), becomes the run's status."""
    run = start_run(settings, group=group, name=name, config=config, run_dir=run_dir, job_type=job_type)
    try:
        yield run
    except BaseException as error:
        status = getattr(error, "status", None)
        run.summary.update({"status": status if isinstance(status, str) else "failed", "error": str(error)})
        run.finish(exit_code=1)
        raise
    run.finish()


def log_epoch(run, record: dict) -> None:
    """One step per epoch, keyed by the epoch number so charts line up across runs."""
    run.log({key: value for key, value in record.items() if key != "epoch"} | {"epoch": record["epoch"]},
            step=record["epoch"])


def log_model_artifact(run, *, collection: str, files: dict[str, Path], metadata: dict,
                       aliases: list[str]) -> None:
    """Log the model files as a `model` artifact of the run (uploaded on `wandb sync` when offline)."""
    run.log_artifact(model_artifact(collection, files, metadata), aliases=aliases)


def run_directory(run) -> str | None:
    """The folder of the run's own files (what `wandb sync` and `wandb leet inspect` take)."""
    directory = getattr(getattr(run, "settings", None), "sync_dir", None)
    return str(directory) if directory else None


def run_url(run) -> str | None:
    """The run's page in W&B; offline and disabled runs have none yet."""
    return None if getattr(getattr(run, "settings", None), "mode", "offline") != "online" else run.url


def run_records(run_dir: Path | str) -> list[dict]:
    """Every record of a local W&B run, as `wandb leet inspect --json` reads them back."""
    output = subprocess.run([*WANDB_COMMAND, "leet", "inspect", "--json", str(run_dir)],
                            capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def staged_artifact_files(run_dir: Path | str) -> list[Path]:
    """The staged copies of the files of the run's artifacts: what `wandb sync` uploads."""
    return [Path(entry["local_path"]) for record in run_records(run_dir) if record["type"] == "artifact"
            for entry in record["artifact"]["manifest"]["contents"] if entry.get("local_path")]
