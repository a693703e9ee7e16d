"""`lr-sweep`: the command line.

    lr-sweep run [--config FILE.toml] [--learning-rates 0.001 0.0005 ...] [--epochs 5] ... [--dry-run]
    lr-sweep find [--model SPEC] [--dataset SPEC] ...
    lr-sweep serve
    lr-sweep server [status|start|stop]
    lr-sweep data [--dataset NAME] [--data-dir DIR]
    lr-sweep models [--collection NAME] [--json]
    lr-sweep promote COLLECTION:vN [--alias NAME] [--force]
    lr-sweep publish SWEEP_ID [--output-dir DIR] [--dry-run]

Every flag that sets a SweepConfig field is generated from the config class (the flag is the
field's name with dashes), so flags, defaults and help can never drift from the config, and
`LR_SWEEP_*` variables work for every command through the config itself. A bad value exits with
code 2 and one line per problem naming the field; no traceback for user errors.

The project's modules are imported inside the commands: `--help` and a bad flag answer at once,
without loading torch, Prefect and W&B.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from flows import local_server
from flows.cli_flags import PRESET_HELP, add_config_arguments, find_fields, flag, parse_config, rebuild_fields
from flows.cli_registry import command_models, command_promote, command_publish
from flows.config import SweepConfig, describe_validation_error
from flows.environment import apply_local_defaults
from flows.preflight import check_run
from models.errors import InputError, RegistryError

EXIT_USER_ERROR = 2
SERVE_DEPLOYMENT = "lr-sweep"  # `prefect deployment run lr-sweep/lr-sweep`, as with prefect.yaml's
# The deployments' definitions: `lr-sweep serve` takes its nightly schedule from there, as
# `prefect deploy` does.
PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"
PREFECT_LOG = "prefect.log"  # Prefect's log lines of a sweep, in its folder
TEMPORARY_SERVER_HELP = ("without PREFECT_API_URL, use a Prefect server for this run only (Prefect's own "
                         "behaviour) instead of the background one `lr-sweep server` manages")


def print_table(summary: dict) -> None:
    from tasks.reporting.report import trial_table

    print(f"{'lr':>9} {'seed':>4} {'status':>9} {'train acc':>9} {'val acc':>8} {'test acc':>8} "
          f"{'val loss':>8} {'sec':>7}  model")
    for r in trial_table(summary["trials"]):
        print(f"{r['learning_rate']:>9g} {r['seed']:>4} {r['status']:>9} {_pct(r['train_accuracy']):>9} "
              f"{_pct(r['val_accuracy']):>8} {_pct(r['test_accuracy']):>8} "
              f"{'-' if r['val_loss'] is None else format(r['val_loss'], '.4f'):>8} "
              f"{'-' if r['train_seconds'] is None else format(r['train_seconds'], '.1f'):>7}  {r['model'] or '-'}")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


@contextlib.contextmanager
def collector_paused(module: str):
    """Import `module` (torch, Prefect and W&B behind it) with the cyclic garbage collector paused,
    then freeze what the imports made. They create about 360,000 long-lived objects and almost no
    garbage; the collector would scan them over and over while they load, again during the run,
    and once more at exit: about 2 s of `lr-sweep run` on 2 cores (`make bench`). Frozen, they
    are never scanned again; what the run creates afterwards is collected as usual. A process
    that has loaded the module already (tests calling main()) is left as it is."""
    if module in sys.modules:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def command_run(args: argparse.Namespace) -> int:
    config = parse_config(args)
    if config.search == "tpe":
        check_study_storage(config)
    # The server first: Prefect reads its settings when it is imported (the data and model checks
    # import it), and the server starts while they run. A refused input leaves it running for the
    # next sweep; nothing of the sweep is written.
    server = None if args.dry_run else launch_server(args)
    with collector_paused("tasks.data.prepare"):  # torch and Prefect behind it
        from tasks.data.spec import DatasetError
    try:
        dataset = check_run(config, dry_run=args.dry_run)
    except DatasetError as error:  # missing or corrupt files: not the config's fault
        print(f"lr-sweep: {error}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        print(f"would train {config.plan_description()} of {config.model} on {dataset.name} "
              f"({dataset.train_size} training images) on device {config.device} (not probed by --dry-run)")
        return 0
    with collector_paused("flows.sweep"):
        from flows.dispatch import RegistryNotShared
        from flows.live_view import sweep_view
        from flows.plan import checked_dataset, new_sweep_id, sweep_folder
        from flows.sweep import SweepFailed, lr_sweep, sweep_run_name
        from tasks.reporting.tracking import WandbUnavailable

    # The sweep's id is fixed here, so its flow run carries the sweep's name from its first line
    # and Prefect's log goes to the sweep's folder from the start.
    config = config.model_copy(update={"sweep_id": config.sweep_id or new_sweep_id()})
    try:
        wait_for_server(server)
        with prefect_log_file(sweep_folder(config) / PREFECT_LOG), sweep_view(sys.stdout, sys.stdout.isatty()), \
                checked_dataset(config, dataset):
            summary = lr_sweep.with_options(flow_run_name=sweep_run_name(config.sweep_id))(config=config)
    except local_server.ServerError as error:
        print(f"lr-sweep: {error}\n(or run with --temporary-server)", file=sys.stderr)
        return 1
    except (SweepFailed, DatasetError, WandbUnavailable, RegistryNotShared) as error:
        print(f"lr-sweep: {error}", file=sys.stderr)
        return 1
    print()
    print_table(summary)
    promotion = summary["promotion"]
    smoke = " (smoke run: train_limit set)" if summary["smoke"] else ""
    print(f"\nbest: lr {summary['best']['learning_rate']:g} seed {summary['best']['seed']} -> "
          f"{summary['best']['model']}{smoke}")
    print(f"alias '{promotion['alias']}': {'moved to ' + promotion['model'] if promotion['promoted'] else 'not moved'} "
          f"({promotion['reason']})")
    print(f"report:  {summary['files']['report']}")
    print(f"summary: {summary['files']['summary']}")
    print(f"log:     {sweep_folder(config) / PREFECT_LOG}")
    return 0


def check_study_storage(config: SweepConfig) -> None:
    """An unreachable Optuna storage is bad input: refused before anything trains (checked
    without writing to it: no study is made)."""
    from tasks.search.tpe import StudyStorageError, check_storage

    if config.optuna_storage is None:
        return  # sqlite in the output directory, made by the sweep
    try:
        check_storage(config.optuna_storage)
    except StudyStorageError as error:
        raise InputError("optuna_storage", str(error)) from None


def launch_server(args: argparse.Namespace) -> tuple[local_server.LocalServer, bool] | None:
    """The background Prefect server (started if none runs), unless PREFECT_API_URL names one or
    --temporary-server asks for Prefect's own. Call it before Prefect is imported: the server
    starts while the imports run, and the API URL is in the environment when Prefect reads it."""
    if args.temporary_server or os.environ.get("PREFECT_API_URL"):
        return None
    server, new = local_server.ensure_started(local_server.prefect_home())
    os.environ["PREFECT_API_URL"] = server.api_url
    return server, new


def wait_for_server(launched: tuple[local_server.LocalServer, bool] | None) -> None:
    if launched is not None:
        server, new = launched
        local_server.wait_until_healthy(server)
        print(f"Prefect UI: {server.url} ({'started' if new else 'reused'}; every sweep of PREFECT_HOME "
              f"{local_server.prefect_home()} is there; `lr-sweep server stop` stops it)", file=sys.stderr)


@contextlib.contextmanager
def prefect_log_file(path: Path):
    """Prefect's log lines of the flow and task runs, also in `path` (the sweep's folder): the
    terminal shows the live view instead, the UI shows them too, and `-v` prints them."""
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield path
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def command_find(args: argparse.Namespace) -> int:
    """The LR range test alone: a suggested rate, the grid `--learning-rates auto` would sweep."""
    config = parse_config(args)
    server = launch_server(args)
    with collector_paused("flows.search"):
        from flows.search import lr_sweep_find

    try:
        wait_for_server(server)
        found = lr_sweep_find(config=config)
    except local_server.ServerError as error:
        print(f"lr-sweep: {error}\n(or run with --temporary-server)", file=sys.stderr)
        return 1
    print(f"suggested learning rate: {found['suggestion']:.3g} (steepest descent of the smoothed loss, "
          f"{found['steps']} steps from {config.min_lr:g} to {config.max_lr:g})")
    print(f"--learning-rates auto would sweep: {' '.join(f'{r:g}' for r in found['grid'])}")
    print(f"chart: {found['chart']}")
    return 0


def nightly_cron() -> str:
    """The cron of prefect.yaml's nightly schedule (definitions.nightly), the one every sweep
    deployment uses."""
    import yaml

    return yaml.safe_load(PREFECT_YAML.read_text())["definitions"]["nightly"][0]["cron"]


def command_serve(args: argparse.Namespace) -> int:
    """Register the sweep on the background server and run what the UI starts: Prefect's
    `flow.serve` (no work pool, no worker). The UI's Run form and the nightly schedule (created
    off, as in prefect.yaml) work from here on; Ctrl-C stops serving."""
    server = launch_server(args)
    with collector_paused("flows.sweep"):
        from prefect.deployments.runner import EntrypointType
        from prefect.schedules import Schedule

        from flows.sweep import lr_sweep

    wait_for_server(server)
    cron = args.cron or nightly_cron()
    schedule = Schedule(cron=cron, timezone="UTC", active=args.schedule_active)
    print(f"serving lr-sweep/{SERVE_DEPLOYMENT}: run it from the UI (Deployments > {SERVE_DEPLOYMENT} > Run) or with "
          f"`prefect deployment run lr-sweep/{SERVE_DEPLOYMENT}`; schedule {cron} UTC "
          f"{'on' if args.schedule_active else 'off (turn it on in the UI)'}", file=sys.stderr)
    # A module entrypoint, as prefect.yaml's: the run imports flows.sweep as the package module (a
    # file entrypoint loads it under another name, where SweepConfig's annotation does not resolve).
    lr_sweep.serve(name=SERVE_DEPLOYMENT, schedules=[schedule], print_starting_message=False, limit=1,
                   entrypoint_type=EntrypointType.MODULE_PATH)
    return 0


def command_server(args: argparse.Namespace) -> int:
    """The background Prefect server `lr-sweep run` uses: status, start, stop."""
    home = local_server.prefect_home()
    if args.action == "stop":
        stopped = local_server.stop_recorded(home)
        print(f"stopped the Prefect server at {stopped.url}" if stopped else f"no lr-sweep server runs for {home}")
        return 0
    if args.action == "start":
        server, _ = local_server.ensure_started(home)
        local_server.wait_until_healthy(server)
    server = local_server.recorded(home)
    if server is None:
        print(f"no lr-sweep server runs for {home}", file=sys.stderr if args.action == "url" else sys.stdout)
        return 0 if args.action == "status" else 1
    if args.action == "url":  # for scripts and the Makefile: PREFECT_API_URL=$(lr-sweep server url)
        print(server.api_url)
        return 0
    print(f"Prefect UI: {server.url} (pid {server.pid}, log {server.log}, PREFECT_HOME {home})")
    return 0


def command_data(args: argparse.Namespace) -> int:
    """Locate (or install, or download) the dataset and verify its files; decode an image folder."""
    from tasks.data.config import DataConfig
    from tasks.data.prepare import prepare_configured, store_dataset
    from tasks.data.spec import DatasetError, DatasetInputError

    config = parse_config(args)
    try:
        ref = prepare_configured(DataConfig.of(config))
        store_dataset(ref)  # every check of this command has passed: later runs read the cache
    except DatasetInputError as error:
        raise InputError(error.field, str(error)) from None
    except DatasetError as error:
        print(f"lr-sweep: {error}", file=sys.stderr)
        return 1
    print(f"{config.dataset}: files in {ref.root}, fingerprint {ref.fingerprint}; {ref.train_size:,} / {ref.val_size:,} / "
          f"{ref.test_size:,} train / val / test images of {ref.channels}x{ref.height}x{ref.width}, {ref.num_classes} classes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fields = SweepConfig.model_fields
    parser = argparse.ArgumentParser(prog="lr-sweep", description="Learning-rate sweep of any PyTorch image "
                                     "classifier: Prefect runs the trials, W&B records them, the best model takes an alias.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a sweep (on the background Prefect server, started if none runs)")
    run.add_argument("--config", metavar="FILE", help=PRESET_HELP)
    add_config_arguments(run)
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan, train nothing")
    run.add_argument("--temporary-server", action="store_true", help=TEMPORARY_SERVER_HELP)
    run.add_argument("-v", "--verbose", action="store_true", help="also print Prefect's log lines (they always go "
                     f"to the UI and to OUTPUT_DIR/SWEEP_ID/{PREFECT_LOG})")
    run.set_defaults(handler=command_run)

    find = commands.add_parser("find", help="LR range test: suggest a learning rate (Smith 2015)")
    find.add_argument("--config", metavar="FILE", help=PRESET_HELP)
    add_config_arguments(find, find_fields())
    find.add_argument("--temporary-server", action="store_true", help=TEMPORARY_SERVER_HELP)
    find.set_defaults(handler=command_find)

    server = commands.add_parser("server", help="the background Prefect server of `lr-sweep run` (UI of every sweep)")
    server.add_argument("action", choices=("status", "start", "stop", "url"), nargs="?", default="status",
                        help="url prints the API URL (for PREFECT_API_URL)")
    server.set_defaults(handler=command_server)

    serve = commands.add_parser("serve", help="register the sweep on the background server and run the "
                                "UI's runs and the nightly schedule (no pool, no worker)")
    serve.add_argument("--cron", default=None, help="the schedule, UTC (default: prefect.yaml's nightly schedule)")
    serve.add_argument("--schedule-active", action="store_true", help="switch the schedule on (default: off, "
                       "as prefect.yaml; turn it on in the UI)")
    serve.add_argument("--temporary-server", action="store_true", help=TEMPORARY_SERVER_HELP)
    serve.set_defaults(handler=command_serve)

    data = commands.add_parser("data", help="fetch and verify the dataset files")
    add_config_arguments(data, ["dataset", "data_dir", "image_size", "val_size", "split_seed", "train_limit", "num_workers",
                                 "max_image_pixels"])
    data.set_defaults(handler=command_data)

    models = commands.add_parser("models", help="list the models of the registry")
    add_config_arguments(models, ["registry_dir"])
    models.add_argument("--collection", help="only this collection (e.g. fashion-mnist-cnn)")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(handler=command_models)

    promote = commands.add_parser("promote", help="move an alias to a model (manual promotion, rollback)")
    promote.add_argument("version", metavar="MODEL", help="COLLECTION:vN (or COLLECTION:ALIAS)")
    add_config_arguments(promote, ["alias", "promotion_margin", "registry_dir", *rebuild_fields()])
    promote.add_argument("--force", action="store_true", help="skip the champion/challenger gate")
    promote.set_defaults(handler=command_promote)

    publish = commands.add_parser("publish", help="upload an offline sweep to W&B and apply its promotion there")
    publish.add_argument("sweep_id", help="the sweep to publish (its folder under the output directory)")
    # data_dir defaults to the sweep's (below); the model's code only as this command names it
    add_config_arguments(publish, ["output_dir", *rebuild_fields("data_dir")])
    # These default to what the sweep recorded in its summary.json, not to SweepConfig's defaults.
    publish.add_argument("--registry-dir", dest="sweeps_registry_dir", default=None,
                         help="local registry that recorded the promotion; default: the sweep's")
    for name in ("wandb_project", "wandb_entity", "wandb_registry_collection"):
        publish.add_argument(flag(name), dest=f"sweeps_{name}", default=None,
                             help=f"{fields[name].description} Default: the sweep's.")
    publish.add_argument("--dry-run", action="store_true", help="check the sweep's files and print the plan; "
                         "nothing is uploaded")
    publish.add_argument("--force", action="store_true", help="give W&B's alias to the sweep's model without "
                         "the gate against W&B's current holder")
    publish.add_argument("--data-dir", dest="sweeps_data_dir", default=None,
                         help="dataset cache with the test set the gate measures both models on; default: the sweep's")
    publish.set_defaults(handler=command_publish)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_local_defaults()  # before Prefect and W&B are imported: they read these at import
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", True):
        # Before Prefect sets up its logging: its console handler prints warnings and errors only;
        # the live view says what the INFO lines said.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    try:
        return args.handler(args)
    except ValidationError as error:
        print("lr-sweep: invalid configuration:\n" + describe_validation_error(error), file=sys.stderr)
        return EXIT_USER_ERROR
    except InputError as error:  # names, sources, the pre-flight: the project's own input checks
        print(f"lr-sweep: invalid input:\n{error.field}: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (RegistryError, local_server.ServerError) as error:
        # Stored state that cannot be used (a digest mismatch, a corrupt table): one line naming
        # what and where. Every other exception is a bug and keeps its traceback (exit 1).
        print(f"lr-sweep: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def console_main() -> int:
    """The `lr-sweep` executable. The process ends right after main(): freezing what is alive
    spares the interpreter's teardown a last full collection over every object (~0.5 s)."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
