"""The `lr-sweep-export` flow: export the model a promotion gave an alias to.

Deployed as `lr-sweep-export/export-local` (prefect.yaml), whose trigger runs it on every
`lr-sweep.model.promoted` event with the event's collection, alias, digest and registry
directory, so a promotion is followed by its bundle without anyone starting it. By hand:

    prefect deployment run lr-sweep-export/export-local --param collection=fashion-mnist-cnn

The work is `tasks.export.export_bundle`; this is its Prefect wrapper: one task, one log line,
the model card as a markdown artifact. The run fails (and writes nothing) when the alias has
moved on to another model since the promotion (`HolderChanged`), when the stored files do not
match their digest, or when a name is not a plain name.
"""

from __future__ import annotations

import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.export import CARD_FILE, export_bundle


def artifact_key(collection: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "model-card-" + (re.sub(r"[^a-z0-9-]+", "-", collection.lower()).strip("-") or "model")


@task(name="export_bundle", task_run_name="export {collection}:{alias}", cache_policy=NO_CACHE)
def export_model(collection: str, alias: str, digest: str | None, registry_dir: str, output_dir: str) -> dict:
    bundle = export_bundle(registry_dir, collection, alias, digest, output_dir)
    reused = " (already there)" if bundle["reused"] else ""
    get_run_logger().info("exported %s (digest %s…) -> %s%s", bundle["model"], bundle["digest"][:12], bundle["path"], reused)
    with open(f"{bundle['path']}/{CARD_FILE}") as card:
        create_markdown_artifact(markdown=card.read(), key=artifact_key(collection),
                                 description=f"Model card of {bundle['model']} ({alias}), digest {bundle['digest'][:12]}")
    return bundle


@flow(name="lr-sweep-export", flow_run_name="export-{collection}-{alias}")
def lr_sweep_export(collection: str, alias: str = "production", digest: str | None = None,
                    registry_dir: str = "registry", output_dir: str = "exports") -> dict:
    """Export the model `alias` names in `collection` (TorchScript, torch.export, model card).

    `digest`: the promoted model's digest, from the promotion event; the export is refused if the
    alias now names another model. None: export whoever holds the alias.
    """
    return export_model(collection, alias, digest, registry_dir, output_dir)
