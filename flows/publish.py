"""`lr-sweep publish SWEEP_ID`: bring a sweep that ran offline into W&B, as if it had run online.

Two steps:
1. `wandb sync` uploads the sweep's offline runs (OUTPUT_DIR/SWEEP_ID/wandb/offline-run-*): config,
   per-epoch metrics, summary and each trial's `model` artifact. W&B uploads an artifact's files
   from the staged copies it made when the run logged them (under WANDB_DATA_DIR, which a sweep
   points at OUTPUT_DIR/.wandb/data), so those must still exist; they are checked first.
2. The promotion the sweep decided (summary.json) is applied to the synced artifacts: the W&B
   version whose FILES have the promoted model's digest (downloaded and hashed: a `digest` key in
   an artifact's metadata is only a claim anyone can copy) receives the alias (and the Registry
   link), after the gate an online sweep passes: it must beat W&B's current holder of the alias,
   both measured on the candidate's test set (`--force` skips the gate and says so). A promotion
   is replayed only while the local registry still gives the alias to that model: if a later
   sweep or a manual promotion moved it since, replaying the old one would set W&B back in
   time, so it is skipped and the reason is said.
3. The sweep's W&B report (tasks/reporting/wandb_report.py) is saved in the project: its curves are drawn by
   W&B from the synced runs, the verdict and tables come from summary.json.

Publishing is idempotent: synced runs are skipped by `wandb sync`, an alias already on the
right version is left as it is, and the report saved before is updated, not added again.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from flows.config import SweepConfig, describe_validation_error
from flows.preflight import check_writable
from models.errors import InputError
from models.local_registry import LocalRegistry
from models.names import check_name, inside
from models.registry import DigestMismatch, split_name
from models.wandb_registry import WandbRegistry
from tasks.reporting import tracking
from tasks.reporting.wandb_report import save_wandb_report

# `wandb sync` has committed the artifacts when it returns; the server may take a moment before
# a query lists them, so the synced version is looked for a few times.
FIND_ATTEMPTS = 6
FIND_INTERVAL_SECONDS = 5.0
# `wandb sync` of a sweep's runs (a few MB each); past this it is stopped and reported.
SYNC_TIMEOUT_SECONDS = 900


class PublishError(RuntimeError):
    """The sweep cannot be published as asked; the message says what is missing."""


@dataclass
class PublishPlan:
    """What `publish` will do, worked out from the sweep's files alone (no W&B call)."""

    sweep_id: str
    sweep_dir: Path
    project: str
    entity: str | None
    registry_collection: str | None
    runs_to_sync: list[Path]
    runs_already_synced: list[Path]
    data_dir: Path | None = None  # where the gate finds the test set
    promotion_margin: float = 0.0
    collection: str | None = None
    alias: str | None = None
    model: str | None = None  # the promoted model, as the local registry names it
    digest: str | None = None
    skip_reason: str | None = None  # why no alias moves, when none does
    reason: str | None = None  # why the sweep promoted it

    def as_dict(self) -> dict:
        return {k: [str(p) for p in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                for k, v in asdict(self).items()}


def offline_runs(sweep_dir: Path) -> list[Path]:
    """The sweep's W&B run folders (each trial's run lands under SWEEP_DIR/wandb)."""
    return sorted(p for p in (sweep_dir / "wandb").glob("offline-run-*") if p.is_dir())


def is_synced(run_dir: Path) -> bool:
    # `wandb sync` leaves RUN.wandb.synced next to a run's log once it is uploaded.
    return any(run_dir.glob("*.wandb.synced"))


def read_summary(sweep_dir: Path) -> dict:
    path = sweep_dir / "summary.json"
    if not path.exists():
        raise PublishError(f"no summary.json in {sweep_dir}: is the sweep id right, and did the "
                           "sweep finish? (--output-dir must be the sweep's output directory)")
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise PublishError(f"{path} is corrupt ({error}): it is not the sweep's summary") from None
    if not isinstance(summary, dict):
        raise PublishError(f"{path} is corrupt (not a JSON object): it is not the sweep's summary")
    return summary


def planned_promotion(summary: dict, local: LocalRegistry) -> dict:
    """The alias move to replay in W&B, or the reason there is none."""
    promotion = summary.get("promotion") or {}
    alias, model = promotion.get("alias"), promotion.get("model")
    if not promotion.get("promoted"):
        return {"alias": alias, "skip_reason": "the sweep moved no alias: "
                f"{promotion.get('reason', 'no promotion recorded')}"}
    digest = next((t["digest"] for t in summary["trials"] if t.get("model") == model), None)
    if digest is None:
        raise PublishError(f"summary.json promotes {model} but lists no trial with that model")
    collection, _ = split_name(model)
    if local.find_by_digest(collection, digest) is None:
        raise PublishError(f"the registry {local.root.resolve()} holds no model with the digest of {model} "
                           f"({digest[:12]}…): is --registry-dir the sweep's registry?")
    holder = local.resolve(collection, alias)
    if holder is None or holder.digest != digest:
        return {"alias": alias, "collection": collection, "model": model, "digest": digest,
                "skip_reason": f"the local registry {local.root} now gives '{alias}' to "
                f"{holder or 'no model'}, not to {model}: a later promotion superseded this "
                "sweep's, so W&B is not set back to it"}
    return {"alias": alias, "collection": collection, "model": model, "digest": digest,
            "reason": promotion.get("reason")}


# What publish takes from the command line, else from the sweep's summary.json, else the defaults.
TARGET_FIELDS = ("wandb_project", "wandb_entity", "wandb_registry_collection", "registry_dir", "data_dir",
                 "promotion_margin")


def checked_targets(given: dict, recorded: dict, summary_path: Path) -> dict:
    """The publication's targets, each checked by SweepConfig's own rules, as the CLI checks its
    flags: summary.json is a file, and a file is input like any other."""
    values = {name: given.get(name) if given.get(name) is not None else recorded.get(name) for name in TARGET_FIELDS}
    try:
        config = SweepConfig(**{name: value for name, value in values.items() if value is not None})
    except ValidationError as error:
        field = next((str(p["loc"][0]) for p in error.errors() if p["loc"]), "config")
        source = "given" if given.get(field) is not None else f"recorded in {summary_path}"
        problems = describe_validation_error(error).splitlines()
        raise InputError(field, "; ".join(line.split(": ", 1)[-1] for line in problems) + f" ({source})") from None
    for name in ("registry_dir", "data_dir"):  # the pre-flight's probe, as `lr-sweep run` does
        try:
            check_writable(name, getattr(config, name))
        except InputError as error:
            source = "given" if given.get(name) is not None else f"recorded in {summary_path}"
            raise InputError(name, f"{error} ({source})") from None
    return {name: getattr(config, name) for name in TARGET_FIELDS}


def plan_publish(sweep_id: str, output_dir: Path | str, *, registry_dir: Path | str | None = None,
                 project: str | None = None, entity: str | None = None,
                 registry_collection: str | None = None, data_dir: Path | str | None = None) -> PublishPlan:
    """Check the sweep's files and work out the publication; unset options default to the sweep's config."""
    check_name("sweep_id", sweep_id)
    sweep_dir = inside(Path(output_dir), sweep_id)
    summary = read_summary(sweep_dir)
    config = summary.get("config", {})
    targets = checked_targets({"wandb_project": project, "wandb_entity": entity, "registry_dir": registry_dir,
                               "wandb_registry_collection": registry_collection, "data_dir": data_dir},
                              config, sweep_dir / "summary.json")
    runs = offline_runs(sweep_dir)
    if not runs:
        raise PublishError(f"no offline W&B runs under {sweep_dir / 'wandb'}: the sweep ran with "
                           f"wandb_mode={config.get('wandb_mode')!r}, so there is nothing to sync")
    to_sync = [run for run in runs if not is_synced(run)]
    missing = [path for run in to_sync for path in tracking.staged_artifact_files(run) if not path.exists()]
    if missing:
        raise PublishError(
            f"{len(missing)} staged artifact file(s) of the sweep's runs are gone (e.g. {missing[0]}); "
            "W&B uploads model artifacts from these copies, so they must stay until the sweep is "
            "published. Re-run the sweep (finished trials are reused from the registry) or restore them.")
    local = LocalRegistry(targets["registry_dir"])
    move = planned_promotion(summary, local)
    return PublishPlan(
        sweep_id=sweep_id, sweep_dir=sweep_dir, project=targets["wandb_project"], entity=targets["wandb_entity"],
        registry_collection=targets["wandb_registry_collection"],
        runs_to_sync=to_sync, runs_already_synced=[run for run in runs if run not in to_sync],
        data_dir=targets["data_dir"], promotion_margin=targets["promotion_margin"],
        collection=move.get("collection"), alias=move.get("alias"), model=move.get("model"),
        digest=move.get("digest"), skip_reason=move.get("skip_reason"), reason=move.get("reason"),
    )


def sync_runs(runs: list[Path], project: str, entity: str | None) -> str:
    """`wandb sync` the runs into PROJECT (and ENTITY); returns its output.

    `wandb sync` (0.31) prints per-run failures, "Not authenticated." among them, and still exits
    0: success is each run's `.wandb.synced` marker, checked afterwards."""
    if not runs:
        return ""
    command = [*tracking.WANDB_COMMAND, "sync", "--yes", "--project", project,
               *(["--entity", entity] if entity else []), *map(str, runs)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SYNC_TIMEOUT_SECONDS,
                              env=os.environ | {"WANDB_SILENT": "false"})
    except subprocess.TimeoutExpired as error:
        raise PublishError(f"`wandb sync` did not finish within {SYNC_TIMEOUT_SECONDS} s "
                           f"({tracking.wandb_server()}):\n{(error.stdout or '')[-2000:]}") from error
    output = done.stdout + done.stderr
    unsynced = [run for run in runs if not is_synced(run)]
    if done.returncode != 0 or unsynced:
        raise PublishError(f"`wandb sync` to {tracking.wandb_server()} failed (exit {done.returncode}; "
                           f"{len(unsynced)} of {len(runs)} run(s) not synced, e.g. "
                           f"{unsynced[0] if unsynced else '-'}); its output:\n{output[-2000:]}")
    return output


def verified_version(plan: PublishPlan, registry, *, attempts: int = FIND_ATTEMPTS,
                     interval_seconds: float = FIND_INTERVAL_SECONDS):
    """(ref, stored model) of the newest W&B version whose downloaded files have the plan's
    digest. Versions whose metadata claims the digest but whose files do not have it are skipped
    (and named, if none is left)."""
    refused: list[str] = []
    for attempt in range(attempts):
        claims = [info.ref for info in registry.versions(plan.collection) if info.ref.digest == plan.digest]
        for ref in reversed(claims):  # newest first, as W&B lists them oldest first
            try:
                return ref, registry.fetch(ref)  # downloads and hashes the files
            except DigestMismatch as error:
                refused.append(f"{ref}: {error}")
        if claims or attempt + 1 == attempts:
            break
        time.sleep(interval_seconds)  # the synced versions may take a moment to be listed
    if refused:
        raise PublishError(f"no W&B version of {plan.collection} in {registry.location} has files with the digest "
                           f"of {plan.model} ({plan.digest}); refused: " + "; ".join(dict.fromkeys(refused)))
    raise PublishError(
        f"no W&B version of {plan.collection} in {registry.location} has the digest of {plan.model} "
        f"({plan.digest}); if that model was reused from an earlier sweep, publish that sweep first")


def apply_promotion(plan: PublishPlan, registry, *, force: bool = False, attempts: int = FIND_ATTEMPTS,
                    interval_seconds: float = FIND_INTERVAL_SECONDS, allowed=None,
                    dataset_spec: str | None = None) -> dict:
    """Give the plan's alias to the verified W&B version of the promoted model, if it beats W&B's
    holder (or with `force`); returns what happened."""
    if plan.skip_reason or plan.alias is None:
        return {"moved": False, "reason": plan.skip_reason}
    ref, stored = verified_version(plan, registry, attempts=attempts, interval_seconds=interval_seconds)
    reason = f"published sweep {plan.sweep_id}: {plan.reason}"
    holder = registry.resolve(plan.collection, plan.alias)
    if holder == ref:
        return {"moved": False, "reason": f"{ref} already holds '{plan.alias}' in W&B"}
    if force:
        reason += " (--force: not gated against W&B's holder)"
        previous = registry.move_alias(ref, plan.alias, reason=reason)
        return {"moved": True, "forced": True, "alias": plan.alias, "model": str(ref),
                "previous": str(previous) if previous else None}
    from tasks.evaluation.manual_promotion import decide_against_holder  # torch and the data: only when gating

    promotion, holder = decide_against_holder(registry, ref, stored.metadata, plan.alias, plan.promotion_margin,
                                              plan.data_dir or SweepConfig.model_fields["data_dir"].default,
                                              allowed=allowed, dataset_spec=dataset_spec)
    if not promotion.promoted:
        return {"moved": False, "reason": f"W&B's '{plan.alias}' stays on {holder}: {promotion.reason} "
                "(publish --force moves it anyway)"}
    previous = registry.move_alias(ref, plan.alias, reason=f"{reason}; {promotion.reason}", expected_holder=holder,
                                   metrics=promotion.challenger_evaluation.model_dump())
    return {"moved": True, "forced": False, "alias": plan.alias, "model": str(ref),
            "previous": str(previous) if previous else None, "gate": promotion.reason}


def publish(plan: PublishPlan, *, registry=None, sync: Callable[[list[Path], str, str | None], str] = sync_runs,
            log: Callable[[str], None] = print, force: bool = False, allowed=None,
            dataset_spec: str | None = None) -> dict:
    """Sync the plan's runs, apply its promotion in W&B, then save the sweep's W&B report.
    `allowed`, `dataset_spec`: the command's own model source and --dataset, what the gate may
    import and read (manual_promotion.decide_against_holder)."""
    tracking.require_online_access(plan.project, plan.entity)
    log(f"syncing {len(plan.runs_to_sync)} run(s) of sweep {plan.sweep_id} to {plan.entity or '(default entity)'}"
        f"/{plan.project} ({len(plan.runs_already_synced)} already synced)")
    sync(plan.runs_to_sync, plan.project, plan.entity)
    if registry is None:
        registry = WandbRegistry(project=plan.project, entity=plan.entity,
                                 registry_collection=plan.registry_collection)
    result = apply_promotion(plan, registry, force=force, allowed=allowed, dataset_spec=dataset_spec)
    try:
        report_url = save_wandb_report(read_summary(plan.sweep_dir), plan.sweep_dir, plan.project, plan.entity)
    except Exception as error:  # the runs and the alias are in W&B by now: say so, and how to retry
        raise PublishError(f"the runs are synced and the promotion applied ({result}), but the W&B report "
                           f"could not be saved: {str(error).rstrip('.')}. Run publish again to retry (it is idempotent).") from error
    log(f"W&B report: {report_url}")
    return {"plan": plan.as_dict(), "promotion": result, "report": report_url}
