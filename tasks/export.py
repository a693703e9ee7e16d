"""Export a promoted model as a self-contained bundle: what comes after a promotion.

`export_bundle` takes the model an alias names (``fashion-mnist-cnn:production``), but only if it
is exactly the model that was promoted (its digest must equal the one the promotion announced),
fetches it from the registry (the files are checked against that digest), rebuilds the network
and writes, into ``OUTPUT_DIR/<collection>-<version>-<digest[:12]>/``:

- ``model.pt``: TorchScript (``torch.jit.script``), loadable with ``torch.jit.load`` without this
  code, from Python or C++ (libtorch);
- ``model.pt2``: the same network as a ``torch.export`` program (``torch.export.load``), the
  format PyTorch now recommends (torch 2.14 marks TorchScript deprecated), batch size dynamic;
- ``model_card.md``: what a person needs to know: version, digest, training, metrics, data and
  normalisation, provenance, and how to load it;
- ``bundle.json``: the same facts for machines, with every other file's SHA-256 and the check below.

Both exported modules are loaded back from the written files and must give the logits of the
stored weights rebuilt in eager mode, to within 1e-5, on a batch of images (real test images
when given, else a fixed seeded random batch). The bundle is written in a temporary folder that
is renamed into place, so a reader sees a complete bundle or none. A bundle already in place is
reused only after the same check: its files must have the SHA-256s its bundle.json lists AND
give the registry's weights' logits (a bundle.json lists whatever its writer put there, so its
own hashes prove nothing about the model). The network is rebuilt by models/sources.py from the
model's recorded source: the CNN and torchvision's models from the record alone, a user's model
only when the export's own configuration names that source (`allowed`) and its code digest is the
recorded one; no metadata, payload or bundle makes it import code. A network that TorchScript
cannot script is exported as the torch.export program alone (bundle.json says why). Plain
functions, no Prefect.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from models.files import file_digest, fsync_dir
from models.local_registry import LocalRegistry
from models.names import NameNotAllowed, inside
from models.names import check_name as check_registry_name
from models.registry import ModelRef, ModelRegistry
from models.sources import InputShape, ModelCodeChanged, ModelSource, rebuild, stored_source
from tasks.data.dataset import channel_values, normalise_
from tasks.evaluation.evaluate import place_model

DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
BUNDLE_FORMAT = "lr-sweep-export/1"
TORCHSCRIPT_FILE = "model.pt"
EXPORTED_PROGRAM_FILE = "model.pt2"
CARD_FILE = "model_card.md"
BUNDLE_FILE = "bundle.json"
TOLERANCE = 1e-5
SAMPLE_BATCH = 64
SAMPLE_SEED = 0


class ExportError(RuntimeError):
    """The bundle cannot be made; nothing was written where a reader looks."""


class InvalidName(ExportError, ValueError):
    """A collection or alias that is not a plain name (it would become part of a path)."""


class AliasNotFound(ExportError, LookupError):
    """No version of the collection holds the alias."""


class HolderChanged(ExportError):
    """The alias is held by another model than the one that was promoted: not exported."""


class ExportMismatch(ExportError):
    """An exported module does not give the logits of the stored weights."""


class NotInThisRegistry(ExportError):
    """No model with the promoted digest is in the registry the export is configured for: the
    promotion happened in another registry (another node's, a container's), not an error here."""


def check_name(kind: str, value: str) -> str:
    """The registry's one name rule (models/names.py), raised as this module's InvalidName."""
    try:
        return check_registry_name(kind, value)
    except NameNotAllowed as error:
        raise InvalidName(str(error)) from None


def _where(registry) -> str:
    return str(getattr(registry, "location", None) or getattr(registry, "root", registry))


def bundle_name(ref: ModelRef) -> str:
    return f"{ref.collection}-{ref.version}-{ref.digest[:12]}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())




def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], shape: InputShape) -> torch.Tensor:
    """Raw images (uint8 0-255, or float 0-1), (N, H, W) or (N, C, H, W) -> the network's input,
    normalised channel by channel (for one channel the arithmetic it always had)."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = images.float()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    expected = (shape.in_channels, shape.image_size, shape.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise ExportError(f"sample images of shape {tuple(images.shape)}; expected (N, {', '.join(map(str, expected))})")
    return normalise_(images.clone(), mean, std).contiguous()


def normalisation(metadata: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) the model was trained with (one float each in models stored
    before they were per channel); without them the bundle could not be used."""
    dataset = metadata.get("dataset") or {}
    try:
        mean = tuple(float(m) for m in channel_values(dataset["mean"]))
        std = tuple(float(s) for s in channel_values(dataset["std"]))
    except (KeyError, TypeError, ValueError):
        raise ExportError("the model's metadata has no dataset mean/std: its inputs could not be prepared") from None
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise ExportError(f"the model's metadata gives dataset mean {list(mean)} and std {list(std)}")
    return mean, std


def bundle_constant(values: tuple[float, ...]) -> float | list[float]:
    """A normalisation constant as bundle.json states it: one float for grey images (as every
    bundle so far), one per channel otherwise."""
    return values[0] if len(values) == 1 else list(values)


def _constant_code(value: float | list[float]) -> str:
    """The constant as the model card's code snippet writes it."""
    if not isinstance(value, list):
        return f"{value}"
    return f"torch.tensor({value}).view(1, {len(value)}, 1, 1)"


def input_shape(metadata: dict) -> InputShape:
    """The images the model was built for (its source record; the architecture of older CNNs)."""
    try:
        return stored_source(metadata)[1]
    except (KeyError, TypeError) as error:
        raise ExportError(f"the model's metadata does not say what images it takes ({error}); not exported") from None


def sample_batch(metadata: dict, sample_images=None) -> tuple[torch.Tensor, str]:
    """The batch both exports are checked on, and a description of it."""
    shape = input_shape(metadata)
    mean, std = normalisation(metadata)
    if sample_images is not None:
        images = normalise(sample_images, mean, std, shape)
        return images, f"{len(images)} test images"
    size = (SAMPLE_BATCH, shape.in_channels, shape.image_size, shape.image_size)
    pixels = torch.rand(size, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    return normalise(pixels, mean, std, shape), f"{SAMPLE_BATCH} random images (seed {SAMPLE_SEED})"


def _max_abs_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    if reference.shape != other.shape:
        return float("inf")
    return (reference - other).abs().max().item()


def _write_exports(model: torch.nn.Module, batch: torch.Tensor, directory: Path) -> dict[str, str]:
    """Write the exports; returns how each file was made, or for TorchScript why it was not."""
    # torch 2.14 marks TorchScript deprecated (FutureWarning); it still is the one format that
    # loads without Python, so it stays, next to the torch.export program, where it scripts.
    made = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            scripted = torch.jit.script(model)
        except Exception as error:  # a user's network with Python TorchScript does not know
            made[TORCHSCRIPT_FILE] = f"not written: torch.jit.script failed ({type(error).__name__}: {str(error)[:200]})"
        else:
            torch.jit.save(scripted, str(directory / TORCHSCRIPT_FILE))
            made[TORCHSCRIPT_FILE] = "torch.jit.script"
    try:
        program = torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as error:
        raise ExportError(f"torch.export cannot export this network ({type(error).__name__}: {error}); not exported") from None
    torch.export.save(program, str(directory / EXPORTED_PROGRAM_FILE))
    made[EXPORTED_PROGRAM_FILE] = "torch.export.export (dynamic batch)"
    return made


@torch.inference_mode()
def _check_exports(directory: Path, reference: torch.Tensor, batch: torch.Tensor) -> dict:
    """Load the exported files back and compare their logits with the eager network's."""
    logits = {}
    if (directory / TORCHSCRIPT_FILE).exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            logits[TORCHSCRIPT_FILE] = torch.jit.load(str(directory / TORCHSCRIPT_FILE), map_location="cpu").eval()(batch)
    logits[EXPORTED_PROGRAM_FILE] = torch.export.load(str(directory / EXPORTED_PROGRAM_FILE)).module()(batch)
    diffs = {name: _max_abs_diff(reference, values) for name, values in logits.items()}
    bad = {name: diff for name, diff in diffs.items() if not diff <= TOLERANCE}
    if bad:
        raise ExportMismatch(", ".join(f"{name} differs from the stored weights by {diff:g}" for name, diff in bad.items())
                             + f" (tolerance {TOLERANCE:g}); not exported")
    agree = all(bool((reference.argmax(1) == values.argmax(1)).all()) for values in logits.values())
    return {"max_abs_diff": max(diffs.values()), "max_abs_diff_by_file": diffs, "tolerance": TOLERANCE,
            "predictions_agree": agree}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "unknown" if value is None else str(value)


def model_card(bundle: dict) -> str:
    """The bundle's facts for a person, in markdown."""
    training, dataset, metrics = bundle["training"], bundle["dataset"], bundle["metrics"]
    code, packages = bundle["code"], bundle["packages"]
    mean, std = bundle["input"]["mean"], bundle["input"]["std"]
    shape = bundle["input"]["shape"]
    lines = [
        f"# {bundle['model']} ({bundle['alias']})",
        "",
        f"The model that holds `{bundle['alias']}` of `{bundle['collection']}`, exported "
        f"{bundle['exported_at']} from the lr-sweep registry.",
        "",
        "| | |",
        "| --- | --- |",
        f"| version | `{bundle['version']}` |",
        f"| digest | `{bundle['digest']}` |",
        f"| alias | `{bundle['alias']}` |",
        f"| sweep | `{_fmt(bundle.get('sweep_id'))}` |",
        f"| learning rate | {_fmt(training.get('learning_rate'))} |",
        f"| seed | {_fmt(training.get('seed'))} |",
        f"| epochs | {_fmt(training.get('epochs'))} |",
        f"| batch size / optimizer | {_fmt(training.get('batch_size'))} / {_fmt(training.get('optimizer'))} |",
        f"| model | `{_fmt(bundle.get('model_source', {}).get('spec'))}` "
        f"{json.dumps(bundle.get('model_source', {}).get('args') or {})}, code `{_fmt(bundle.get('model_source', {}).get('code_digest'))}` |",
        f"| schedule / precision | {_fmt(training.get('lr_schedule', 'constant'))} / {_fmt(training.get('precision', 'fp32'))} |",
        f"| hidden units | {_fmt((bundle['architecture'] or {}).get('hidden_units'))} |",
        "",
        "## Metrics (at the last epoch)",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {name} | {_fmt(value)} |" for name, value in sorted(metrics.items())),
        "",
        "## Data",
        "",
        f"- dataset: `{_fmt(dataset.get('name'))}`, fingerprint `{_fmt(dataset.get('fingerprint'))}`",
        *([f"- classes (index: name): {', '.join(f'{i}: {n}' for i, n in enumerate(dataset['class_names']))}"]
          if dataset.get("class_names") else []),
        f"- training / validation images: {_fmt(dataset.get('train_size'))} / {_fmt(dataset.get('val_size'))}"
        f" (split seed {_fmt(dataset.get('split_seed'))})",
        f"- input: float32, shape (N, {', '.join(map(str, shape[1:]))}), pixels scaled to [0, 1] then "
        f"normalised: `(x - {mean}) / {std}`{' channel by channel' if isinstance(mean, list) else ''}; output: "
        f"{bundle['model_source'].get('shape', {}).get('num_classes') or (bundle['architecture'] or {}).get('num_classes')} logits",
        "",
        "## Provenance",
        "",
        f"- training code: sha256 `{_fmt(code.get('training_source_sha256'))}`, git commit `{_fmt(code.get('git_commit'))}`",
        "- packages at training: " + ", ".join(f"{name} {_fmt(version)}" for name, version in sorted(packages.items())),
        f"- exported with torch {bundle['exporter']['torch']}",
        "",
        "## Check",
        "",
        f"Both files were loaded back and compared with the stored weights rebuilt in eager mode on "
        f"{bundle['verification']['batch']}: max abs logit difference "
        f"{bundle['verification']['max_abs_diff']:.3g} (tolerance {bundle['verification']['tolerance']:g}).",
        "",
        "## Load it",
        "",
        "```python",
        "import torch",
        (f'model = torch.jit.load("{TORCHSCRIPT_FILE}").eval()   # or torch.export.load("{EXPORTED_PROGRAM_FILE}").module()'
         if TORCHSCRIPT_FILE in bundle["files"] else f'model = torch.export.load("{EXPORTED_PROGRAM_FILE}").module()'),
        f"pixels = torch.rand(8, {', '.join(map(str, shape[1:]))})            # your images, scaled to [0, 1]",
        f"logits = model((pixels - {_constant_code(mean)}) / {_constant_code(std)})",
        "print(logits.argmax(dim=1))                  # class indices",
        "```",
        "",
        "Files (SHA-256): " + ", ".join(f"`{name}` `{digest[:16]}…`" for name, digest in sorted(bundle["files"].items())),
        "",
    ]
    return "\n".join(lines)


REQUIRED_FILES = frozenset({EXPORTED_PROGRAM_FILE, CARD_FILE})  # model.pt too, where the network scripts


def _existing_bundle(path: Path, digest: str, alias: str, reference: torch.Tensor, batch: torch.Tensor) -> dict | None:
    """A complete bundle already in place for this digest and alias: its files match the SHA-256s
    it lists, and its modules, loaded back, give the stored weights' logits on `batch`. Anything
    else (a planted or half-replaced bundle) is None: it is rebuilt."""
    try:
        bundle = json.loads((path / BUNDLE_FILE).read_text())
        if bundle.get("format") != BUNDLE_FORMAT or bundle.get("digest") != digest or bundle.get("alias") != alias:
            return None
        listed = set(bundle["files"])
        if not REQUIRED_FILES <= listed <= REQUIRED_FILES | {TORCHSCRIPT_FILE} \
                or set(os.listdir(path)) != listed | {BUNDLE_FILE}:
            return None
        if any(file_digest(path / name) != sha for name, sha in bundle["files"].items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    try:
        recheck = _check_exports(path, reference, batch)
    except Exception:  # whatever a foreign file makes the loaders raise: not our bundle
        return None
    return bundle | {"rechecked": recheck}


def _rebuild(metadata: dict, allowed: ModelSource | None, name: str) -> torch.nn.Module:
    try:
        return rebuild(metadata, allowed, name=name)
    except ModelCodeChanged as error:
        raise ExportError(f"{error}; not exported") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"the model's network cannot be rebuilt by this code ({error}); not exported") from None


def export_bundle(registry: ModelRegistry | str | Path, collection: str, alias: str, expected_digest: str | None,
                  output_dir: str | Path, sample_images=None, allowed: ModelSource | None = None) -> dict:
    """Export the model `alias` names in `collection`; returns bundle.json's content plus `path`.

    `expected_digest`: the digest the promotion announced; the model behind the alias must be
    exactly that one (HolderChanged otherwise). None exports whoever holds the alias now.
    `sample_images`: raw test images ((N, H, W) or (N, C, H, W), uint8 or float in [0, 1]) to
    check the exports on; normalised with the dataset's mean and std from the model's metadata.
    An identical bundle already in place is kept and returned with `reused: True`. `allowed`:
    the model source the export's own configuration names, the only user code it may import.
    """
    check_name("collection", collection)
    check_name("alias", alias)
    if expected_digest is not None and not (isinstance(expected_digest, str) and DIGEST_PATTERN.fullmatch(expected_digest)):
        raise ExportError(f"expected digest {expected_digest!r} is not a SHA-256 (64 lowercase hex digits)")
    if isinstance(registry, (str, Path)):
        registry = LocalRegistry(registry)
    output_dir = Path(output_dir)

    ref = registry.resolve(collection, alias)
    if expected_digest is not None and (ref is None or ref.digest != expected_digest) \
            and registry.find_by_digest(collection, expected_digest) is None:
        raise NotInThisRegistry(f"no model of {collection} in {_where(registry)} has the promoted digest "
                                f"{expected_digest[:12]}…: the promotion happened in another registry; nothing to export")
    if ref is None:
        raise AliasNotFound(f"no version of {collection} holds '{alias}'; nothing to export")
    if expected_digest is not None and ref.digest != expected_digest:
        raise HolderChanged(f"'{alias}' of {collection} is held by {ref.version} (digest {ref.digest[:12]}…), "
                            f"not by the promoted model (digest {expected_digest[:12]}…); refusing to export it")
    if not DIGEST_PATTERN.fullmatch(ref.digest) or not re.fullmatch(r"v\d+", ref.version):
        raise ExportError(f"registry gave an unexpected reference {ref!r}")
    stored = registry.fetch(ref)  # re-checks every file against ref.digest (DigestMismatch)
    metadata = stored.metadata
    arch = metadata.get("architecture")
    shape = input_shape(metadata)
    mean, std = normalisation(metadata)
    batch, description = sample_batch(metadata, sample_images)

    output_dir.mkdir(parents=True, exist_ok=True)
    root = output_dir.resolve()
    final = output_dir / bundle_name(ref)
    try:
        inside(root, final.name)
    except ValueError as error:  # e.g. a symlink put in its place
        raise ExportError(f"bundle path {final}: {error}; refusing to write") from None
    if final.resolve().parent != root:
        raise ExportError(f"bundle path {final} resolves to {final.resolve()}, outside {root}; refusing to write")
    # The eager reference: the stored weights in the layout the project runs them in.
    eager = _rebuild(metadata, allowed, str(ref))
    eager.load_state_dict(stored.state_dict)
    eager = place_model(eager, "cpu").eval()
    with torch.inference_mode():
        reference = eager(batch.contiguous(memory_format=torch.channels_last))
    existing = _existing_bundle(final, ref.digest, alias, reference, batch) if final.is_dir() else None
    if existing is not None:
        return existing | {"path": str(final.resolve()), "reused": True}

    plain = _rebuild(metadata, allowed, str(ref))  # exported in the default layout: it loads anywhere
    plain.load_state_dict(stored.state_dict)
    plain.eval()

    dataset = metadata.get("dataset", {})
    staging = root / f".{final.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        made = _write_exports(plain, batch, staging)
        verification = _check_exports(staging, reference, batch) | {"batch": description, "batch_size": len(batch)}
        bundle = {
            "format": BUNDLE_FORMAT,
            "model": str(ref),
            "collection": ref.collection,
            "version": ref.version,
            "digest": ref.digest,
            "alias": alias,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sweep_id": metadata.get("sweep_id"),
            "architecture": arch,
            "model_source": metadata.get("model_source", {"spec": "cnn"}),
            "training": metadata.get("training", {}),
            "metrics": metadata.get("metrics", {}),
            "dataset": dataset,
            "code": metadata.get("code", {}),
            "packages": metadata.get("packages", {}),
            "input": {"shape": [None, shape.in_channels, shape.image_size, shape.image_size], "dtype": "float32",
                      "scale": "pixels / 255", "mean": bundle_constant(mean), "std": bundle_constant(std)},
            "exporter": {"torch": torch.__version__, **made},
            "verification": verification,
            "files": {},
        }
        for name in (TORCHSCRIPT_FILE, EXPORTED_PROGRAM_FILE):
            if (staging / name).exists():
                bundle["files"][name] = file_digest(staging / name)
        (staging / CARD_FILE).write_text(model_card(bundle | {"files": dict(bundle["files"])}))
        bundle["files"][CARD_FILE] = file_digest(staging / CARD_FILE)
        (staging / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2, sort_keys=True, allow_nan=False) + "\n")
        for name in (*bundle["files"], BUNDLE_FILE):
            _fsync_file(staging / name)
        fsync_dir(staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Someone else put a bundle there meanwhile (same digest: same content), or a broken
            # one is in the way: keep a good one, replace a broken one.
            existing = _existing_bundle(final, ref.digest, alias, reference, batch)
            if existing is not None:
                shutil.rmtree(staging, ignore_errors=True)
                return existing | {"path": str(final.resolve()), "reused": True}
            stale = root / f".{final.name}.{uuid.uuid4().hex}.stale"
            os.rename(final, stale)
            os.rename(staging, final)
            shutil.rmtree(stale, ignore_errors=True)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return bundle | {"path": str(final.resolve()), "reused": False}
