"""`lr-sweep`: the command line.

    lr-sweep run [--learning-rates 0.001 0.0005 ...] [--epochs 5] ... [--dry-run]
    lr-sweep models [--collection NAME] [--json]
    lr-sweep promote COLLECTION:vN --alias NAME [--force]
    lr-sweep publish SWEEP_ID [--output-dir DIR] [--dry-run]

Every flag of `run` is a SweepConfig field with dashes, generated from the config class, so the
flags, their defaults and their help can never drift from the config. A bad value exits with
code 2 and one line per problem naming the field; no traceback for user errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from pathlib import Path

from flows.environment import apply_local_defaults

apply_local_defaults()  # before Prefect and W&B are imported: they read these at import

from pydantic import ValidationError  # noqa: E402

from flows.config import SweepConfig, describe_validation_error  # noqa: E402

EXIT_USER_ERROR = 2


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per SweepConfig field; values are validated by SweepConfig itself."""
    for name, field in SweepConfig.model_fields.items():
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        default = field.default
        help_text = f"{field.description} Default: {default if not isinstance(default, list) else ' '.join(map(str, default))}."
        options: dict = {"default": argparse.SUPPRESS, "dest": name}
        if origin is list:
            options.update(nargs="+", metavar=args[0].__name__.upper())
        elif origin is typing.Literal:
            help_text += f" Allowed: {', '.join(args)}."
            options.update(metavar="{" + ",".join(args) + "}")
        elif origin in (typing.Union, types.UnionType):
            options.update(type=_none_or(str), metavar="VALUE|none")
        elif annotation is bool:
            options.update(action=argparse.BooleanOptionalAction)
        parser.add_argument(_flag(name), help=help_text, **options)


def parse_config(namespace: argparse.Namespace) -> SweepConfig:
    given = {name: getattr(namespace, name) for name in SweepConfig.model_fields if hasattr(namespace, name)}
    return SweepConfig(**given)


def print_table(summary: dict) -> None:
    from tasks.report import trial_table

    header = f"{'lr':>9} {'seed':>4} {'status':>9} {'train acc':>9} {'val acc':>8} {'test acc':>8} {'val loss':>8} {'sec':>7}  model"
    print(header)
    for r in trial_table(summary["trials"]):
        def pct(v):
            return "-" if v is None else f"{100 * v:.2f}"
        print(f"{r['learning_rate']:>9g} {r['seed']:>4} {r['status']:>9} {pct(r['train_accuracy']):>9} "
              f"{pct(r['val_accuracy']):>8} {pct(r['test_accuracy']):>8} "
              f"{'-' if r['val_loss'] is None else format(r['val_loss'], '.4f'):>8} "
              f"{'-' if r['train_seconds'] is None else format(r['train_seconds'], '.1f'):>7}  {r['model'] or '-'}")


def command_run(args: argparse.Namespace) -> int:
    config = parse_config(args)
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        from tasks.devices import resolve_devices

        print(f"would train {len(config.trial_grid())} trial(s) on {', '.join(resolve_devices(config.device))}")
        return 0
    from flows.sweep import SweepFailed, lr_sweep
    from tasks.data import DatasetError
    from tasks.tracking import WandbUnavailable

    try:
        summary = lr_sweep(config=config)
    except (SweepFailed, DatasetError, WandbUnavailable) as error:
        print(f"lr-sweep: {error}", file=sys.stderr)
        return 1
    print()
    print_table(summary)
    promotion = summary["promotion"]
    print(f"\nbest: lr {summary['best']['learning_rate']:g} seed {summary['best']['seed']} -> {summary['best']['model']}")
    print(f"alias '{promotion['alias']}': {'moved to ' + promotion['model'] if promotion['promoted'] else 'not moved'} "
          f"({promotion['reason']})")
    print(f"report:  {summary['files']['report']}")
    print(f"summary: {summary['files']['summary']}")
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


def _registry(args):
    from models.registry import LocalRegistry

    return LocalRegistry(args.registry_dir)


def command_models(args: argparse.Namespace) -> int:
    registry = _registry(args)
    collections = [args.collection] if args.collection else registry.collections()
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
    """Manual promotion: the sweep's champion/challenger gate, unless --force (e.g. a rollback)."""
    from models.registry import ModelNotFound, split_name
    from tasks.compare import decide_promotion
    from tasks.data import load_splits, prepare_dataset
    from tasks.evaluate import evaluate_stored_model

    registry = _registry(args)
    collection, tag = split_name(args.model)
    ref = registry.resolve(collection, tag)
    if ref is None:
        raise ModelNotFound(f"no model {args.model!r} in {registry.root}")
    if args.force:
        previous = registry.move_alias(ref, args.alias, reason="manual promotion (--force)")
        print(f"'{args.alias}' -> {ref} (was {previous or 'unset'}): manual promotion (--force)")
        return 0
    # Both models are measured on the test set of the candidate's dataset, as in the sweep.
    dataset_meta = registry.fetch(ref).metadata["dataset"]
    dataset = prepare_dataset(dataset_meta["name"], args.data_dir, dataset_meta["val_size"],
                              dataset_meta["split_seed"], None)
    splits = load_splits(dataset, "cpu")

    def evaluate(name: str) -> dict:
        return evaluate_stored_model(registry, name, splits, "cpu").as_dict()

    promotion, holder = decide_promotion(registry, ref, evaluate(str(ref)), args.alias, args.margin, evaluate)
    if not promotion["promoted"]:
        print(f"lr-sweep: not promoted: {promotion['reason']}; use --force to promote anyway "
              "(e.g. a rollback)", file=sys.stderr)
        return 1
    registry.move_alias(ref, args.alias, reason=f"manual promotion: {promotion['reason']}", expected_holder=holder)
    print(f"'{args.alias}' -> {ref} (was {holder or 'unset'}): {promotion['reason']}")
    return 0


def command_publish(args: argparse.Namespace) -> int:
    """Upload an offline sweep's W&B runs, then give the alias in W&B to the model it promoted."""
    from flows.publish import PublishError, plan_publish, publish
    from tasks.tracking import WandbUnavailable

    try:
        plan = plan_publish(args.sweep_id, args.output_dir, registry_dir=args.registry_dir,
                            project=args.wandb_project, entity=args.wandb_entity,
                            registry_collection=args.wandb_registry_collection)
        if args.dry_run:
            print(json.dumps(plan.as_dict(), indent=2))
            return 0
        result = publish(plan)
    except (PublishError, WandbUnavailable) as error:
        print(f"lr-sweep: {error}", file=sys.stderr)
        return 1
    promotion = result["promotion"]
    where = f"{plan.entity + '/' if plan.entity else ''}{plan.project}"
    print(f"synced {len(plan.runs_to_sync)} run(s) to {where} ({len(plan.runs_already_synced)} already synced)")
    if promotion["moved"]:
        print(f"'{promotion['alias']}' -> {promotion['model']} in W&B (was {promotion['previous'] or 'unset'})")
    else:
        print(f"no alias moved in W&B: {promotion['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    defaults = SweepConfig.model_fields
    parser = argparse.ArgumentParser(prog="lr-sweep", description="Learning-rate sweep of a small CNN.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a sweep (starts a temporary Prefect server if none is set)")
    add_config_arguments(run)
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan, train nothing")
    run.set_defaults(handler=command_run)

    data = commands.add_parser("data", help="fetch and verify the dataset files")
    data.add_argument("--dataset", dest="dataset", default=argparse.SUPPRESS,
                      help=SweepConfig.model_fields["dataset"].description)
    data.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS,
                      help=SweepConfig.model_fields["data_dir"].description)
    data.set_defaults(handler=command_data)

    for name, handler, help_text in (("models", command_models, "list the models of the registry"),
                                     ("promote", command_promote, "move an alias to a model (manual promotion, rollback)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--registry-dir", type=Path, default=Path(os.environ.get(
            "LR_SWEEP_REGISTRY_DIR", defaults["registry_dir"].default)), help="local registry directory")
        sub.set_defaults(handler=handler)
        if name == "models":
            sub.add_argument("--collection", help="only this collection (e.g. fashion-mnist-cnn)")
            sub.add_argument("--json", action="store_true", help="print JSON")
        else:
            sub.add_argument("model", help="COLLECTION:vN (or COLLECTION:ALIAS)")
            sub.add_argument("--alias", default=defaults["alias"].default, help="alias to move")
            sub.add_argument("--force", action="store_true", help="skip the champion/challenger gate")
            sub.add_argument("--margin", type=float, default=defaults["promotion_margin"].default,
                             help="test-accuracy margin the gate requires")
            sub.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
                "LR_SWEEP_DATA_DIR", defaults["data_dir"].default)), help="dataset directory (for the gate)")

    publish = commands.add_parser("publish", help="upload an offline sweep to W&B and apply its promotion there")
    publish.add_argument("sweep_id", help="the sweep to publish (its folder under the output directory)")
    publish.add_argument("--output-dir", type=Path, default=Path(os.environ.get(
        "LR_SWEEP_OUTPUT_DIR", defaults["output_dir"].default)), help=defaults["output_dir"].description)
    publish.add_argument("--registry-dir", type=Path, default=None,
                         help="local registry that recorded the promotion; default: the sweep's")
    for name in ("wandb_project", "wandb_entity", "wandb_registry_collection"):
        publish.add_argument(_flag(name), dest=name, default=None,
                             help=f"{defaults[name].description} Default: the sweep's.")
    publish.add_argument("--dry-run", action="store_true", help="check the sweep's files and print the plan; "
                         "nothing is uploaded")
    publish.set_defaults(handler=command_publish)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as error:
        print("lr-sweep: invalid configuration:\n" + describe_validation_error(error), file=sys.stderr)
        return EXIT_USER_ERROR
    except (LookupError, ValueError) as error:
        print(f"lr-sweep: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
