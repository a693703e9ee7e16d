"""Reproducible randomness for trials and packs: each epoch's data order a function of (seed,
epoch), deterministic algorithms on by default, one lock around torch's global generators."""

from __future__ import annotations

import os
import threading

import torch

# torch's global generators are shared by every thread: a trial's network initialisation
# (seeded, tasks/train.py) and a pack's per-epoch reseeding take this lock.
RNG_LOCK = threading.Lock()


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator that random ops (Dropout) on `device` draw from."""
    return torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator


def shuffle(seed: int, epoch: int, size: int, device) -> torch.Tensor:
    """The order of one epoch: a function of (seed, epoch) alone, so resuming reproduces it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).to(device)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic algorithms (and what they need) on or off for this process. Call it before
    CUDA initialises: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle.

    warn_only: an op with no deterministic kernel (e.g. AdaptiveAvgPool2d's CUDA backward in
    torchvision's ResNets) warns instead of failing the trial; the mode is still recorded."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def deterministic_mode() -> bool:
    return torch.are_deterministic_algorithms_enabled()
