"""`lr-sweep publish SWEEP_ID`: bring a sweep that ran offline into W&B, as if it had run online.

Two steps:
1. `wandb sync` uploads the sweep's offline runs (OUTPUT_DIR/SWEEP_ID/wandb/offline-run-*): config,
   per-epoch metrics, summary and each trial's `model` artifact. W&B uploads an artifact's files
   from the staged copies it made when the run logged them (under WANDB_DATA_DIR, which a sweep
   points at OUTPUT_DIR/.wandb/data), so those must still exist; they are checked first.
2. The promotion the sweep decided (summary.json) is applied to the synced artifacts: the W&B
   version whose files have the promoted model's digest receives the alias (and the Registry
   link). A promotion is replayed only while the local registry still gives the alias to that
   model: if a later sweep or a manual promotion moved it since, replaying the old one would
   set W&B back in time, so it is skipped and the reason is said.
3. The sweep's W&B report (tasks/wandb_report.py) is saved in the project: its curves are drawn by
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

from flows.config import REGISTRY_COLLECTION_PATTERN, SweepConfig
from models.local_registry import LocalRegistry
from models.names import check_name, inside
from models.registry import ModelRef, split_name
from models.wandb_registry import WandbRegistry
from tasks import tracking
from tasks.wandb_report import save_wandb_report

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
    return json.loads(path.read_text())


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


def plan_publish(sweep_id: str, output_dir: Path | str, *, registry_dir: Path | str | None = None,
                 project: str | None = None, entity: str | None = None,
                 registry_collection: str | None = None) -> PublishPlan:
    """Check the sweep's files and work out the publication; unset options default to the sweep's config."""
    check_name("sweep_id", sweep_id)
    if registry_collection is not None and not REGISTRY_COLLECTION_PATTERN.fullmatch(registry_collection):
        raise ValueError(f"wandb_registry_collection {registry_collection!r} is not allowed: use "
                         "wandb-registry-REGISTRY/COLLECTION (optionally ORG/ before it)")
    sweep_dir = inside(Path(output_dir), sweep_id)
    summary = read_summary(sweep_dir)
    config = summary.get("config", {})
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
    defaults = SweepConfig.model_fields
    local = LocalRegistry(registry_dir or config.get("registry_dir") or defaults["registry_dir"].default)
    move = planned_promotion(summary, local)
    return PublishPlan(
        sweep_id=sweep_id, sweep_dir=sweep_dir,
        project=project or config.get("wandb_project") or defaults["wandb_project"].default,
        entity=entity or config.get("wandb_entity"),
        registry_collection=registry_collection or config.get("wandb_registry_collection"),
        runs_to_sync=to_sync, runs_already_synced=[run for run in runs if run not in to_sync],
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


def apply_promotion(plan: PublishPlan, registry, *, attempts: int = FIND_ATTEMPTS,
                    interval_seconds: float = FIND_INTERVAL_SECONDS) -> dict:
    """Give the plan's alias to the synced W&B version of the promoted model; returns what happened."""
    if plan.skip_reason or plan.alias is None:
        return {"moved": False, "reason": plan.skip_reason}
    ref: ModelRef | None = None
    for attempt in range(attempts):
        if (ref := registry.find_by_digest(plan.collection, plan.digest)) is not None:
            break
        if attempt + 1 < attempts:
            time.sleep(interval_seconds)
    if ref is None:
        raise PublishError(
            f"no W&B version of {plan.collection} in {registry.location} has the digest of {plan.model} "
            f"({plan.digest}); if that model was reused from an earlier sweep, publish that sweep first")
    previous = registry.move_alias(ref, plan.alias, reason=f"published sweep {plan.sweep_id}: {plan.reason}")
    return {"moved": True, "alias": plan.alias, "model": str(ref), "previous": str(previous) if previous else None}


def publish(plan: PublishPlan, *, registry=None, sync: Callable[[list[Path], str, str | None], str] = sync_runs,
            log: Callable[[str], None] = print) -> dict:
    """Sync the plan's runs, apply its promotion in W&B, then save the sweep's W&B report."""
    tracking.require_online_access(plan.project, plan.entity)
    log(f"syncing {len(plan.runs_to_sync)} run(s) of sweep {plan.sweep_id} to {plan.entity or '(default entity)'}"
        f"/{plan.project} ({len(plan.runs_already_synced)} already synced)")
    sync(plan.runs_to_sync, plan.project, plan.entity)
    if registry is None:
        registry = WandbRegistry(project=plan.project, entity=plan.entity,
                                 registry_collection=plan.registry_collection)
    result = apply_promotion(plan, registry)
    try:
        report_url = save_wandb_report(read_summary(plan.sweep_dir), plan.sweep_dir, plan.project, plan.entity)
    except Exception as error:  # the runs and the alias are in W&B by now: say so, and how to retry
        raise PublishError(f"the runs are synced and the promotion applied ({result}), but the W&B report "
                           f"could not be saved: {str(error).rstrip('.')}. Run publish again to retry (it is idempotent).") from error
    log(f"W&B report: {report_url}")
    return {"plan": plan.as_dict(), "promotion": result, "report": report_url}
