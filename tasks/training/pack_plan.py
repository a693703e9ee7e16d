"""Which trials train together: packs of one pack key, as many members as the device takes."""

from __future__ import annotations

import json
from typing import Literal, Sequence

# What members of one pack may differ in (besides their learning rate and seed): everything else of
# a trial (model, data, batch size, epochs, schedule kind, precision, optimizer) shapes the one
# vmapped step they share.
MEMBER_TRAINING_FIELDS = ("warmup_epochs", "weight_decay")
# `pack` auto on CUDA: at most this many members (27 small CNNs reached 752,000 images/s on an
# H200; past ~32 a small model's pack is bound by the GPU's arithmetic, not by launches).
PACK_CAP = 32


def pack_key(spec) -> str:
    """Trials with one key train in one pack: equal in everything but their learning rate, seed
    and MEMBER_TRAINING_FIELDS (a TrialSpec's model and training groups)."""
    training = {k: v for k, v in spec.training.model_dump().items() if k not in MEMBER_TRAINING_FIELDS}
    return json.dumps({"training": training, "network": spec.network.model_dump()}, sort_keys=True, default=str)


def pack_size(pack: Literal["auto", "off"] | int, device_type: str) -> int:
    """How many members a pack may hold: `auto` fills a GPU (up to PACK_CAP; the engine's probe
    may split it further) and trains one trial at a time on a CPU, where a pack is no faster."""
    if pack == "off":
        return 1
    if pack == "auto":
        return PACK_CAP if device_type == "cuda" else 1
    return int(pack)


def plan_packs(specs: Sequence, size: int) -> list[list]:
    """The trials grouped into packs of at most `size` members of one pack key, in the order of
    `specs` (the first trial of each key opens its first pack)."""
    groups: dict[str, list] = {}
    for spec in specs:
        groups.setdefault(pack_key(spec), []).append(spec)
    return [members[start:start + size] for members in groups.values()
            for start in range(0, len(members), max(1, size))]
