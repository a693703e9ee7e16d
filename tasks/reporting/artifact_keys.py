"""The one rule for Prefect artifact keys, which take lowercase letters, digits and dashes only."""

from __future__ import annotations

import re


def artifact_key(kind: str, name: str) -> str:
    """`kind-name` with every other character of `name` a dash: progress-lr0-001-seed0,
    wandb-lr0-001-seed0, model-card-fashion-mnist-cnn."""
    return f"{kind}-{re.sub(r'[^a-z0-9-]+', '-', name.lower()).strip('-') or 'unnamed'}"
