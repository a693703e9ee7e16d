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
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from flows import local_server
from flows.config import SweepConfig, describe_validation_error
from flows.environment import apply_local_defaults
from flows.preflight import check_run
from models.errors import InputError, RegistryError

EXIT_USER_ERROR = 2
SERVE_DEPLOYMENT = "lr-sweep"  # `prefect deployment run lr-sweep/lr-sweep`, as with prefect.yaml's
NIGHTLY_CRON = "0 2 * * *"
PRESET_HELP = ("a preset: a .toml or .yaml file of SweepConfig fields (examples/*.toml); the flags given "
               "override it, and it overrides LR_SWEEP_* variables")
TEMPORARY_SERVER_HELP = ("without PREFECT_API_URL, use a Prefect server for this run only (Prefect's own "
                         "behaviour) instead of the background one `lr-sweep server` manages")


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    return parse


# The help's groups, from the group word of each field's title ("1 Experiment · epochs").
HELP_GROUPS = {"Experiment": "Experiment", "Search": "Search", "Selection": "Selection and promotion",
               "Promotion": "Selection and promotion", "Infrastructure": "Infrastructure",
               "Tracking": "Tracking and storage", "Storage": "Tracking and storage"}
# What `find` (the range test alone) does not use: the grid, the registry, where models go.
NOT_FOR_FIND = {"learning_rates", "epochs", "collection", "registry", "registry_dir", "wandb_registry_collection"}


def help_group(name: str) -> str:
    title = SweepConfig.model_fields[name].title or ""
    word = title.split(" · ")[0].split(" ", 1)[-1]
    return HELP_GROUPS.get(word, "Other")


def find_fields() -> list[str]:
    """The range test's flags: the experiment, tracking and storage fields a range test uses,
    its own (min_lr, max_lr, auto_factors) and the device."""
    fields = SweepConfig.model_fields
    return [name for name in fields
            if (help_group(name) in ("Experiment", "Tracking and storage") and name not in NOT_FOR_FIND)
            or "range test" in (fields[name].title or "") or name in ("auto_factors", "device")]


def add_config_arguments(parser: argparse.ArgumentParser, names: typing.Iterable[str] | None = None) -> None:
    """One flag per SweepConfig field (or per field in `names`), in the help group of its title;
    values are validated by SweepConfig itself."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names or SweepConfig.model_fields:
        field = SweepConfig.model_fields[name]
        group = help_group(name)
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        default = field.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else json.dumps(default) if isinstance(default, dict) else default
        help_text = field.description
        options: dict = {"default": argparse.SUPPRESS, "dest": name}
        lists = [a for a in (args if origin in (typing.Union, types.UnionType) else (annotation,))
                 if typing.get_origin(a) is list]
        if lists:  # a list, or a list or a keyword (learning_rates: FLOAT ... or 'auto')
            item = typing.get_args(lists[0])[0].__name__.upper()
            keywords = [k for a in args if typing.get_origin(a) is typing.Literal for k in typing.get_args(a)]
            options.update(nargs="+", metavar=item if not keywords else f"{item}|{'|'.join(keywords)}")
        elif origin is typing.Literal:
            help_text += f" Allowed: {', '.join(args)}."
            options.update(metavar="{" + ",".join(args) + "}")
        elif origin in (typing.Union, types.UnionType):
            options.update(type=_none_or(str), metavar="VALUE|none")
        elif annotation is bool:
            options.update(action=argparse.BooleanOptionalAction)
        help_text = f"{help_text} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        groups[group].add_argument(_flag(name), help=help_text, **options)


def parse_config(namespace: argparse.Namespace) -> SweepConfig:
    """The config from the given flags, then the preset file (--config), then LR_SWEEP_*
    variables, then SweepConfig's defaults."""
    given = {name: getattr(namespace, name) for name in SweepConfig.model_fields if hasattr(namespace, name)}
    preset = read_preset(namespace.config) if getattr(namespace, "config", None) else {}
    return SweepConfig(**(preset | given))


def read_preset(path: str) -> dict:
    """A preset (nanoGPT's config/*.py, as TOML or YAML): a table whose keys are SweepConfig
    fields, e.g. `epochs = 1`; SweepConfig refuses unknown keys and bad values, naming them."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise InputError("config", f"cannot read {path}: {error.strerror}") from None
    if file.suffix not in (".toml", ".yaml", ".yml"):
        raise InputError("config", f"{path}: use a .toml or .yaml file")
    import tomllib
    import yaml

    try:
        values = tomllib.loads(text) if file.suffix == ".toml" else yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise InputError("config", f"{path} is not valid {file.suffix[1:].upper()}: {error}") from None
    if not isinstance(values, dict):
        raise InputError("config", f"{path} must hold a table of SweepConfig fields, not {type(values).__name__}")
    return values


def print_table(summary: dict) -> None:
    from tasks.report import trial_table

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
    with collector_paused("tasks.data"):  # torch behind it
        from tasks.data import DatasetError
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
    server = launch_server(args)
    with collector_paused("flows.sweep"):
        from flows.dispatch import RegistryNotShared
        from flows.sweep import SweepFailed, lr_sweep
        from tasks.tracking import WandbUnavailable

    try:
        wait_for_server(server)
        with terminal_progress(sys.stdout.isatty()):
            summary = lr_sweep(config=config)
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
    return 0


def check_study_storage(config: SweepConfig) -> None:
    """An unreachable Optuna storage is bad input: refused before anything trains (checked
    without writing to it: no study is made)."""
    from tasks.tpe import StudyStorageError, check_storage

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
        print(f"Prefect UI: {server.url} ({'started' if new else 'reused'}; every sweep of this "
              "PREFECT_HOME is there; `lr-sweep server stop` stops it)", file=sys.stderr)


@contextlib.contextmanager
def terminal_progress(enabled: bool):
    """A bar per trial (epochs, images/s, validation accuracy) while the sweep runs, when stdout
    is a terminal; plain log lines otherwise (logs, CI)."""
    if not enabled:
        yield
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from tasks import progress as trial_progress

    bars = Progress(TextColumn("{task.fields[trial]:>16}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.description}"), transient=False)
    ids: dict[str, int] = {}

    def update(trial: str, percent: float, status: str) -> None:
        if trial not in ids:
            ids[trial] = bars.add_task(status, total=100, trial=trial)
        bars.update(ids[trial], completed=percent, description=status)

    trial_progress.add_observer(update)
    try:
        with bars:
            yield
    finally:
        trial_progress.remove_observer(update)


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
    schedule = Schedule(cron=args.cron, timezone="UTC", active=args.schedule_active)
    print(f"serving lr-sweep/{SERVE_DEPLOYMENT}: run it from the UI (Deployments > {SERVE_DEPLOYMENT} > Run) or with "
          f"`prefect deployment run lr-sweep/{SERVE_DEPLOYMENT}`; schedule {args.cron} UTC "
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
    """Locate (or install, or download) the dataset and verify its files."""
    from tasks.data import DatasetError, locate_dataset

    config = parse_config(args)
    try:
        root, fingerprint = locate_dataset(config.dataset, config.data_dir)
    except DatasetError as error:
        print(f"lr-sweep: {error}", file=sys.stderr)
        return 1
    print(f"{config.dataset}: files in {root}, fingerprint {fingerprint}")
    return 0


def command_models(args: argparse.Namespace) -> int:
    from models.local_registry import LocalRegistry
    from models.names import check_name

    registry = LocalRegistry(parse_config(args).registry_dir)
    collections = [check_name("collection", args.collection)] if args.collection else registry.collections()
    listing = []
    for collection in collections:
        for info in registry.versions(collection):
            metadata = info.metadata
            listing.append({
                "model": str(info.ref), "digest": info.ref.digest, "aliases": info.aliases,
                "learning_rate": metadata["training"]["learning_rate"], "seed": metadata["training"]["seed"],
                "epochs": metadata["training"]["epochs"], "metrics": metadata["metrics"],
                "sweep_id": metadata.get("sweep_id"), "created_at": info.created_at,
            })
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if not listing:
        print(f"no models in {registry.root}")
        return 0
    print(f"{'model':<28} {'lr':>9} {'seed':>4} {'val acc':>8}  aliases")
    for row in listing:
        print(f"{row['model']:<28} {row['learning_rate']:>9g} {row['seed']:>4} "
              f"{100 * row['metrics']['val_accuracy']:>8.2f}  {', '.join(row['aliases'])}")
    return 0


def command_promote(args: argparse.Namespace) -> int:
    """Manual promotion: the sweep's champion/challenger gate, unless --force (e.g. a rollback).

    Either way the model's files are checked against its digest first (as every fetch does), and
    the move is announced with the sweep's `lr-sweep.model.promoted` event, so the export
    automation exports what a rollback rolled back to."""
    events_url = promotion_event_server()  # before Prefect is imported: it reads PREFECT_API_URL then
    from models.local_registry import LocalRegistry
    from models.registry import split_name
    from models.sources import ModelSource
    from tasks.data import DatasetError
    from tasks.manual_promotion import decide_against_holder
    from tasks.results import Promotion

    config = parse_config(args)
    registry = LocalRegistry(config.registry_dir)
    collection, tag = split_name(args.version)
    ref = registry.resolve(collection, tag)
    if ref is None:
        raise InputError("model", f"no model {args.version!r} in {registry.root}")
    stored = registry.fetch(ref)  # DigestMismatch unless every file has the manifest's digest
    if args.force:
        previous = registry.move_alias(ref, config.alias, reason="manual promotion (--force)")
        promotion = Promotion(alias=config.alias, promoted=True, reason="manual promotion (--force)",
                              model=ref, previous=previous)
        print(f"'{config.alias}' -> {ref} (was {previous or 'unset'}): manual promotion (--force)")
    else:
        try:
            promotion, holder = decide_against_holder(
                registry, ref, stored.metadata, config.alias, config.promotion_margin, config.data_dir,
                allowed=ModelSource(spec=config.model, args=config.model_args))  # the only user code it may import
        except DatasetError as error:
            print(f"lr-sweep: {error}", file=sys.stderr)
            return 1
        if not promotion.promoted:
            print(f"lr-sweep: not promoted: {promotion.reason}; use --force to promote anyway "
                  "(e.g. a rollback)", file=sys.stderr)
            return 1
        registry.move_alias(ref, config.alias, reason=f"manual promotion: {promotion.reason}", expected_holder=holder)
        print(f"'{config.alias}' -> {ref} (was {holder or 'unset'}): {promotion.reason}")
    announce_promotion(events_url, promotion, registry, stored.metadata)
    return 0


def promotion_event_server() -> str | None:
    """The Prefect API a manual promotion's event goes to: PREFECT_API_URL, else the background
    server of this PREFECT_HOME while it answers. Never a temporary one: an automation lives in
    a running server's database, and a server started for one event has none."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        server = local_server.recorded(local_server.prefect_home())
        if server is not None and local_server.is_healthy(server.url):
            url = os.environ["PREFECT_API_URL"] = server.api_url
    return url


def announce_promotion(events_url: str | None, promotion, registry, metadata: dict) -> None:
    if events_url is None:
        print("no Prefect server runs (PREFECT_API_URL unset, no `lr-sweep server`): the promotion event "
              "was not sent, so no export automation follows it", file=sys.stderr)
        return
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.compare import emit_promoted

    limited = (metadata.get("dataset") or {}).get("train_limit") is not None
    with temporary_settings({PREFECT_API_URL: events_url}):
        emit_promoted(promotion, metadata.get("sweep_id"), str(registry.root.resolve()), limited)
        EventsWorker.drain_all(timeout=30)  # sent before the command says it is done
    print(f"sent lr-sweep.model.promoted for {promotion.model} to {events_url}", file=sys.stderr)


def command_publish(args: argparse.Namespace) -> int:
    """Upload an offline sweep's W&B runs, then give the alias in W&B to the model it promoted."""
    from flows.publish import PublishError, plan_publish, publish
    from tasks.data import DatasetError
    from tasks.tracking import WandbUnavailable

    try:
        plan = plan_publish(args.sweep_id, parse_config(args).output_dir, registry_dir=args.sweeps_registry_dir,
                            project=args.sweeps_wandb_project, entity=args.sweeps_wandb_entity,
                            registry_collection=args.sweeps_wandb_registry_collection,
                            data_dir=args.sweeps_data_dir)
        if args.dry_run:
            print(json.dumps(plan.as_dict(), indent=2))
            return 0
        result = publish(plan, force=args.force)
    except (PublishError, WandbUnavailable, DatasetError) as error:  # DatasetError: the gate's test set
        print(f"lr-sweep: {error}", file=sys.stderr)
        return 1
    promotion = result["promotion"]
    where = f"{plan.entity + '/' if plan.entity else ''}{plan.project}"
    print(f"synced {len(plan.runs_to_sync)} run(s) to {where} ({len(plan.runs_already_synced)} already synced)")
    if promotion["moved"]:
        how = ("--force: not gated against W&B's holder" if promotion["forced"]
               else f"it beats W&B's holder: {promotion['gate']}")
        print(f"'{promotion['alias']}' -> {promotion['model']} in W&B (was {promotion['previous'] or 'unset'}; {how})")
    else:
        print(f"no alias moved in W&B: {promotion['reason']}")
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
    serve.add_argument("--cron", default=NIGHTLY_CRON, help=f"the schedule, UTC (default: {NIGHTLY_CRON!r}, as prefect.yaml)")
    serve.add_argument("--schedule-active", action="store_true", help="switch the schedule on (default: off, "
                       "as prefect.yaml; turn it on in the UI)")
    serve.add_argument("--temporary-server", action="store_true", help=TEMPORARY_SERVER_HELP)
    serve.set_defaults(handler=command_serve)

    data = commands.add_parser("data", help="fetch and verify the dataset files")
    add_config_arguments(data, ["dataset", "data_dir"])
    data.set_defaults(handler=command_data)

    models = commands.add_parser("models", help="list the models of the registry")
    add_config_arguments(models, ["registry_dir"])
    models.add_argument("--collection", help="only this collection (e.g. fashion-mnist-cnn)")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(handler=command_models)

    promote = commands.add_parser("promote", help="move an alias to a model (manual promotion, rollback)")
    promote.add_argument("version", metavar="MODEL", help="COLLECTION:vN (or COLLECTION:ALIAS)")
    add_config_arguments(promote, ["alias", "promotion_margin", "registry_dir", "data_dir", "model", "model_args"])
    promote.add_argument("--force", action="store_true", help="skip the champion/challenger gate")
    promote.set_defaults(handler=command_promote)

    publish = commands.add_parser("publish", help="upload an offline sweep to W&B and apply its promotion there")
    publish.add_argument("sweep_id", help="the sweep to publish (its folder under the output directory)")
    add_config_arguments(publish, ["output_dir"])
    # These default to what the sweep recorded in its summary.json, not to SweepConfig's defaults.
    publish.add_argument("--registry-dir", dest="sweeps_registry_dir", default=None,
                         help="local registry that recorded the promotion; default: the sweep's")
    for name in ("wandb_project", "wandb_entity", "wandb_registry_collection"):
        publish.add_argument(_flag(name), dest=f"sweeps_{name}", default=None,
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
