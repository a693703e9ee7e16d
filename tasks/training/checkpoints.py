"""Trial checkpoints: model, optimizer (and gradient scaler) state after each epoch, in one
safetensors file replaced atomically, so a killed trial continues from its last epoch with the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from models.files import atomic_write
from tasks.results import TrialSpec

CHECKPOINT_FILE = "checkpoint.safetensors"
RNG_KEY = "rng.state"


class CheckpointRefused(Exception):
    """A readable checkpoint of this trial that must not be continued (another precision). Not a
    RuntimeError: those mean an unreadable file, which is discarded, and this one must not be."""


log = logging.getLogger(__name__)


def save_checkpoint(directory: Path, spec: TrialSpec, epoch: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, history: list[dict], train_seconds: float,
                    scaler_state: dict | None = None, rng_state: torch.Tensor | None = None) -> None:
    """Model and optimizer state after `epoch`, in one safetensors file replaced atomically;
    `rng_state`, the state of the generator Dropout draws from, so a resumed trial draws on."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    scalars = {}
    for index, state in optimizer_state["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    if rng_state is not None:
        tensors[RNG_KEY] = rng_state
    header = {"epoch": epoch, "spec": spec.model_dump(), "history": history, "train_seconds": train_seconds,
              "param_groups": optimizer_state["param_groups"], "scalars": scalars,
              "scaler": scaler_state}
    directory.mkdir(parents=True, exist_ok=True)
    data = save_safetensors({k: v.cpu() for k, v in tensors.items()}, metadata={"state": json.dumps(header)})
    atomic_write(directory / CHECKPOINT_FILE, data)


def load_checkpoint(directory: Path, spec: TrialSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                    up_to_epoch: int | None = None) -> dict | None:
    """Restore the last completed epoch into `model` and `optimizer`; None when there is none,
    or when it is past `up_to_epoch` (a longer run of the same trial: this one starts over).

    A checkpoint that cannot be read (truncated, from another layout of the network) is
    discarded with a warning and the trial starts from scratch: a damaged file must not fail
    the trial on every rerun. One written under another precision is refused (CheckpointRefused):
    its optimizer moments are not what this precision would have made."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return _restore(path, spec, model, optimizer, up_to_epoch)
    except (SafetensorError, OSError, ValueError, KeyError, IndexError, RuntimeError) as error:
        log.warning(f"discarding unreadable checkpoint {path} ({type(error).__name__}: {error}); "
                    "the trial starts from scratch")
        path.unlink(missing_ok=True)
        return None


def checkpointed_history(directory: Path) -> list[dict]:
    """The epochs a checkpoint holds (its history), without loading any tensor; [] without one."""
    try:
        with safe_open(str(directory / CHECKPOINT_FILE), framework="pt") as handle:
            return json.loads(handle.metadata()["state"])["history"]
    except (SafetensorError, OSError, ValueError, KeyError):
        return []


def _restore(path: Path, spec: TrialSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
             up_to_epoch: int | None) -> dict | None:
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["state"])
    written = header["spec"].get("precision", "fp32")
    if written != spec.training.precision:
        raise CheckpointRefused(f"checkpoint {path} was written in {written}; this trial trains in "
                                f"{spec.training.precision}: delete it to start over, or resume in {written}")
    if up_to_epoch is not None and header["epoch"] > up_to_epoch:
        log.info(f"checkpoint {path} is at epoch {header['epoch']}, past {up_to_epoch}: not used")
        return None
    tensors = load_file(str(path))
    device = next(model.parameters()).device
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            param = params[int(index)]
            if value.shape == param.shape and value.shape:
                # A moment takes its parameter's memory layout back (channels_last convs): the
                # fused optimizer walks parameter, gradient and moments as flat buffers, so a
                # moment restored in another layout would be applied to the wrong elements.
                value = torch.empty_like(param).copy_(value)
            state.setdefault(int(index), {})[name] = value.to(device)
    for key, value in header["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    model.load_state_dict(model_state)
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    return header | {"rng_state": tensors.get(RNG_KEY)}
