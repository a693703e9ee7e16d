"""The registry's commands: `models` (list), `promote` (a manual promotion or a rollback, gated
like a sweep's unless --force, announced by the same event) and `publish` (an offline sweep into
W&B). Imported by flows/cli.py; each imports what it needs inside, so `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flows import local_server
from flows.cli_flags import parse_config
from models.errors import InputError


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
    from tasks.data.spec import DatasetError, DatasetInputError
    from tasks.evaluation.manual_promotion import decide_against_holder
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
                allowed=current_source(config),  # the only user code it may import
                dataset_spec=config.dataset)
        except DatasetInputError:
            raise  # bad input (exit 2, the field named), not missing files
        except DatasetError as error:
            print(f"lr-sweep: {error}", file=sys.stderr)
            return 1
        if not promotion.promoted:
            print(f"lr-sweep: not promoted: {promotion.reason}; use --force to promote anyway "
                  "(e.g. a rollback)", file=sys.stderr)
            return 1
        registry.move_alias(ref, config.alias, reason=f"manual promotion: {promotion.reason}", expected_holder=holder,
                            metrics=promotion.challenger_evaluation.model_dump())
        print(f"'{config.alias}' -> {ref} (was {holder or 'unset'}): {promotion.reason}")
    announce_promotion(events_url, promotion, registry, stored.metadata)
    return 0


def current_source(config):
    """The command's own model source, its code as the files hold it now (a process that
    imported it before, as a test does, imports it again if it changed)."""
    from models.config import ModelConfig

    source = ModelConfig.of(config).source()
    source.refresh()
    return source


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

    from tasks.evaluation.compare import emit_promoted

    limited = (metadata.get("dataset") or {}).get("train_limit") is not None
    with temporary_settings({PREFECT_API_URL: events_url}):
        emit_promoted(promotion, metadata.get("sweep_id"), str(registry.root.resolve()), limited)
        EventsWorker.drain_all(timeout=30)  # sent before the command says it is done
    print(f"sent lr-sweep.model.promoted for {promotion.model} to {events_url}", file=sys.stderr)


def command_publish(args: argparse.Namespace) -> int:
    """Upload an offline sweep's W&B runs, then give the alias in W&B to the model it promoted."""
    from flows.publish import PublishError, plan_publish, publish
    from tasks.data.spec import DatasetError
    from tasks.reporting.tracking import WandbUnavailable

    try:
        config = parse_config(args)
        plan = plan_publish(args.sweep_id, config.output_dir, registry_dir=args.sweeps_registry_dir,
                            project=args.sweeps_wandb_project, entity=args.sweeps_wandb_entity,
                            registry_collection=args.sweeps_wandb_registry_collection,
                            data_dir=args.sweeps_data_dir)
        if args.dry_run:
            print(json.dumps(plan.as_dict(), indent=2))
            return 0
        result = publish(plan, force=args.force, allowed=current_source(config), dataset_spec=config.dataset)
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
