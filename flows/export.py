"""The `lr-sweep-export` flow: export the model a promotion gave an alias to.

Deployed as `lr-sweep-export/export-local` (process pool) and `lr-sweep-export/export-docker`
(the GPU pool's containers, with the sweep's volumes), whose trigger runs it on every
`lr-sweep.model.promoted` event. The event only SELECTS: its collection, alias and digest are
the trigger's parameters, nothing else. Which registry is opened and where bundles go is the
deployment's own configuration: its parameters (`registry`, `registry_dir`, `wandb_project`,
`wandb_entity`, `output_dir`), else SweepConfig's value (its default, or the worker's
`LR_SWEEP_*` environment), checked by SweepConfig's rules. A promotion made in another registry
(another deployment's, a container's) is not this deployment's to export: the run completes
saying so (`NotInThisRegistry`). By hand:

    prefect deployment run lr-sweep-export/export-local --param collection=fashion-mnist-cnn

The work is `tasks.export.export_bundle`; this is its Prefect wrapper: one task, one log line,
the model card as a markdown artifact. The run fails (and writes nothing) when the alias has
moved on to another model since the promotion (`HolderChanged`), when the stored files do not
match their digest, or when a name is not a plain name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.config import SweepConfig
from models.backends import open_registry
from models.config import ModelConfig
from tasks.export import CARD_FILE, NotInThisRegistry, export_bundle
from tasks.reporting.artifact_keys import artifact_key

# Bundles go beside the sweeps, in the output directory's folder kept for them (models/names.py
# reserves the name), so a container's bundles land on the outputs volume with the sweeps.
EXPORTS_FOLDER = "exports"


def export_settings(registry: str | None = None, registry_dir: str | None = None, wandb_project: str | None = None,
                    wandb_entity: str | None = None, model: str | None = None,
                    model_args: dict | None = None) -> SweepConfig:
    """The deployment's registry settings and model source: the given ones, else SweepConfig's,
    all checked by it. A W&B registry is read online (offline W&B cannot fetch artifacts): it
    needs WANDB_API_KEY."""
    given = {"registry": registry, "registry_dir": registry_dir, "wandb_project": wandb_project,
             "wandb_entity": wandb_entity, "wandb_mode": "online" if registry == "wandb" else None,
             "model": model, "model_args": model_args}
    return SweepConfig(**{name: value for name, value in given.items() if value is not None})


@task(name="export_bundle", task_run_name="export {collection}:{alias}", cache_policy=NO_CACHE)
def export_model(collection: str, alias: str, digest: str | None, config: SweepConfig, output_dir: str) -> dict:
    logger = get_run_logger()
    registry = open_registry(config.registry, config.registry_dir, project=config.wandb_project,
                             entity=config.wandb_entity, registry_collection=None)
    allowed = ModelConfig.of(config).source()
    allowed.refresh()  # a long-lived worker exports with the code as it is now, not as first imported
    try:
        bundle = export_bundle(registry, collection, alias, digest, output_dir, allowed=allowed)
    except NotInThisRegistry as error:
        logger.info("not exported: %s", error)
        return {"exported": False, "reason": str(error)}
    reused = " (already there, files and logits re-checked)" if bundle["reused"] else ""
    logger.info("exported %s (digest %s…) -> %s%s", bundle["model"], bundle["digest"][:12], bundle["path"], reused)
    with open(f"{bundle['path']}/{CARD_FILE}") as card:
        create_markdown_artifact(markdown=card.read(), key=artifact_key("model-card", collection),
                                 description=f"Model card of {bundle['model']} ({alias}), digest {bundle['digest'][:12]}")
    return bundle | {"exported": True}


@flow(name="lr-sweep-export", flow_run_name="export-{collection}-{alias}")
def lr_sweep_export(collection: str, alias: str = SweepConfig.model_fields["alias"].default,
                    digest: str | None = None, registry: Literal["local", "wandb"] | None = None,
                    registry_dir: str | None = None, wandb_project: str | None = None,
                    wandb_entity: str | None = None, output_dir: str | None = None, model: str | None = None,
                    model_args: dict | None = None) -> dict:
    """Export the model `alias` names in `collection` (TorchScript, torch.export, model card).

    `digest`: the promoted model's digest, from the promotion event; the export is refused if the
    alias now names another model. None: export whoever holds the alias. The registry settings
    and `output_dir` are the deployment's (None: SweepConfig's; output_dir: OUTPUT_DIR/exports).
    `model`, `model_args`: the deployment's model source, the only user code the export may
    import to rebuild a user's model (an event's payload cannot name one).
    """
    config = export_settings(registry, registry_dir, wandb_project, wandb_entity, model, model_args)
    target = output_dir if output_dir is not None else str(Path(config.output_dir) / EXPORTS_FOLDER)
    return export_model(collection, alias, digest, config, target)
