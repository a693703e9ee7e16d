"""What makes two trials the same: the key a trained model is reused by, and the key (and
folder) a checkpoint is continued by."""

from __future__ import annotations

import math

import torch

from models.serialization import identity_digest
from models.sources import InputShape
from tasks.data.dataset import DatasetRef
from tasks.provenance import code_version
from tasks.results import TrialSpec
from tasks.training.schedules import depends_on_length


def input_shape(dataset: DatasetRef) -> InputShape:
    return InputShape(in_channels=dataset.channels, image_size=dataset.image_size, num_classes=dataset.num_classes)


def trial_key(spec: TrialSpec, dataset: DatasetRef) -> str:
    """Identity of a trial's result: same key, same weights. Reuse of stored models goes by it."""
    identity = {
        "spec": spec.model_dump(),
        "model_source": spec.network.source().record(input_shape(dataset)),
        "dataset": dataset.as_metadata(),
        "code": code_version()["training_source_sha256"],
        "torch": torch.__version__,
    }
    return identity_digest(identity)


def checkpoint_key(spec: TrialSpec, dataset: DatasetRef) -> str:
    """Identity of a trial's trajectory: everything that shapes its schedule. A schedule whose
    rates do not depend on the number of steps (constant, step, with a warmup that fits) gives the
    same key for every number of epochs, so a trial stopped at epoch E of a search, or killed
    there, continues from its checkpoint to any later epoch with the weights of an uninterrupted
    run; one that does (cosine, onecycle, a warmup cut to the trial's length) keeps the epochs."""
    if depends_on_length(spec.training):
        return trial_key(spec, dataset)
    # One length stands for all: the shortest the warmup fits in, so that no cut trial shares it.
    return trial_key(spec.but(epochs=max(1, math.ceil(spec.training.warmup_epochs))), dataset)


def checkpoint_folder(spec: TrialSpec, dataset: DatasetRef) -> str:
    """The name of a trial's checkpoint folder under the checkpoint root."""
    return checkpoint_key(spec, dataset)[:24]
