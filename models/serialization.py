"""Weights as safetensors bytes and the content digest that every stored model carries.

Nothing here unpickles: weights are safetensors, metadata is JSON. The digest of a stored model
is the SHA-256 of its manifest (one line per file with that file's own SHA-256), in the spirit of
W&B's artifact digest, so a change to any file of a version changes the digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"


def weights_to_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    # safetensors wants dense, CPU tensors; channels_last conv weights are not dense in the
    # default layout, so they are copied to it (the values are unchanged).
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    return save_safetensors(tensors)


def weights_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(data)


def metadata_to_bytes(metadata: dict) -> bytes:
    return json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_digest(file_hashes: dict[str, str]) -> str:
    """Digest of a set of files, from their names and SHA-256s (order independent)."""
    lines = "".join(f"{name}:{file_hashes[name]}\n" for name in sorted(file_hashes))
    return sha256_hex(lines.encode())


def identity_digest(value) -> str:
    """The one digest of a JSON-serialisable identity (a trial's key, a study's name): keys
    sorted, so two equal identities always give one digest."""
    return sha256_hex(json.dumps(value, sort_keys=True).encode())


def digest_files(contents: dict[str, bytes]) -> tuple[dict[str, str], str]:
    """Each file's SHA-256 and the digest of the set: what is stored on write, checked on read."""
    hashes = {name: sha256_hex(data) for name, data in contents.items()}
    return hashes, manifest_digest(hashes)


def write_files(contents: dict[str, bytes], directory: Path) -> dict[str, Path]:
    """Write a model's files into `directory` (made if missing); returns their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in contents.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)
    return paths


def model_files(state_dict: dict[str, torch.Tensor], metadata: dict) -> dict[str, bytes]:
    """The files of one stored model, as both registry backends write them."""
    return {WEIGHTS_FILE: weights_to_bytes(state_dict), METADATA_FILE: metadata_to_bytes(metadata)}
