"""Model sources: what builds the network a trial trains, and what rebuilds a stored one.

A source is a spec and its JSON arguments (`SweepConfig.model`, `model_args`):

- `cnn`: the reference network of models/cnn.py (`hidden_units` from the config);
- `torchvision:NAME`: a classification builder of `torchvision.models`, called with
  `num_classes` and `weights=None` (no download, no pretrained weights); images with one channel
  are repeated to the three channels these networks take (`GreyToRGB`);
- `package.module:function` or `path/to/file.py:function`: the user's factory, called as
  `function(num_classes=..., in_channels=..., image_size=..., **model_args)`, returning an
  `nn.Module` (models/user_code.py finds and loads it).

Every stored model records `source_record()`: the spec, the arguments, the shape it was built
for and a code digest (the files' SHA-256 for user code, the torchvision version for its models,
models/cnn.py's own digest for the CNN). `rebuild()` builds a stored model's network again from
that record, and refuses when the code it would run is not the code that trained the model, or
when the record names user code the running command did not name itself.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.cnn import ARCHITECTURE_NAME, architecture, build_model
from models.errors import InputError
from models.source_spec import ARGS_FIELD, FIELD, TORCHVISION_PREFIX, source_kind
from models.user_code import CodeRef, SourceError, load, load_callable, parse_code_spec


class ModelCodeChanged(InputError):
    """A stored model's code digest differs from the code that would rebuild it: the command's
    model flags name other code than the model's (exit 2, one line naming both digests)."""

    def __init__(self, message: str):
        super().__init__(FIELD, message)

    def __reduce__(self):
        return type(self), (str(self),)


@dataclass(frozen=True)
class InputShape:
    """What the data gives the network: channels, a square image size, classes."""

    in_channels: int
    image_size: int
    num_classes: int


@dataclass(frozen=True)
class ModelSource:
    spec: str = ARCHITECTURE_NAME
    args: dict = field(default_factory=dict)
    hidden_units: int = 128  # the CNN's; the other sources take their sizes from `args`

    @property
    def kind(self) -> str:
        return source_kind(self.spec)

    def code(self) -> CodeRef:
        return parse_code_spec(self.spec, FIELD)

    def digest(self) -> str:
        """The code digest of this source: for user code, of the bytes this process imported
        (models/user_code.py load), not of what the files hold by now."""
        if self.kind == "cnn":
            return "sha256:" + hashlib.sha256(Path(__file__).with_name("cnn.py").read_bytes()).hexdigest()
        if self.kind == "torchvision":
            import torchvision

            return f"torchvision=={torchvision.__version__}"
        return "sha256:" + load(self.code(), FIELD).digest

    def refresh(self) -> None:
        """At a sweep's start: user code imported again if a file that counts changed since this
        process imported it (a long-lived `lr-sweep serve`, an edit between two runs)."""
        if self.kind == "user":
            load(self.code(), FIELD, fresh=True)

    def build(self, shape: InputShape) -> nn.Module:
        """A new network for `shape` (initialised from torch's global RNG: seed it first)."""
        if self.kind == "cnn":
            return build_model(self.architecture(shape))
        if self.kind == "torchvision":
            return _torchvision_model(self.spec[len(TORCHVISION_PREFIX):], self.args, shape)
        return _user_model(load_callable(self.code(), FIELD), self.spec, self.args, shape)

    def architecture(self, shape: InputShape) -> dict | None:
        """The CNN's architecture dict (stored as today), None for the other sources."""
        if self.kind != "cnn":
            return None
        return architecture(self.hidden_units, shape.in_channels, shape.image_size, shape.num_classes)

    def record(self, shape: InputShape) -> dict:
        """What a stored model says about its source (metadata key `model_source`)."""
        record = {"spec": self.spec, "kind": self.kind, "args": self.args, "shape": vars(shape),
                  "code_digest": self.digest()}
        if self.kind == "user":  # which files counted, so a changed digest says which file changed
            record["code_files"] = load(self.code(), FIELD).files
        return record


class GreyToRGB(nn.Module):
    """Repeats a one-channel image to the three channels a torchvision network takes."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images.expand(-1, 3, -1, -1))


def torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(name: str, args: dict, shape: InputShape) -> nn.Module:
    import torchvision.models

    if name not in torchvision_names():
        raise SourceError(FIELD, f"torchvision:{name} is not a classification model of torchvision "
                                 f"{torchvision.__version__}; e.g. resnet18, mobilenet_v3_small, efficientnet_b0 "
                                 "(torchvision.models.list_models(module=torchvision.models) lists them)")
    if shape.in_channels not in (1, 3):
        raise SourceError(FIELD, f"torchvision:{name} takes 3-channel images; the data has {shape.in_channels} "
                                 "channels (write a model factory for it)")
    try:
        network = torchvision.models.get_model(name, weights=None, num_classes=shape.num_classes, **args)
    except (TypeError, ValueError) as error:
        raise SourceError(ARGS_FIELD, f"torchvision:{name} refused {args}: {error}") from None
    return GreyToRGB(network) if shape.in_channels == 1 else network


def _user_model(factory, spec: str, args: dict, shape: InputShape) -> nn.Module:
    try:
        network = factory(num_classes=shape.num_classes, in_channels=shape.in_channels,
                          image_size=shape.image_size, **args)
    except TypeError as error:  # the arguments do not fit its signature
        raise SourceError(ARGS_FIELD, f"{spec} refused its arguments {args}: {error}") from None
    except Exception as error:
        raise SourceError(FIELD, f"{spec} failed: {type(error).__name__}: {error}") from None
    except SystemExit as error:  # else `lr-sweep run` would end with the factory's exit code
        raise SourceError(FIELD, f"{spec} exited while building the network (SystemExit({error.code!r}))") from None
    if not isinstance(network, nn.Module):
        raise SourceError(FIELD, f"{spec} returned a {type(network).__name__}, not a torch.nn.Module")
    return network


_check_lock = threading.Lock()


def check_source(source: ModelSource, shape: InputShape) -> None:
    """Build the network once and run two blank images through it: a factory that fails, returns
    no module or gives logits of the wrong shape is refused before any training."""
    with _check_lock:
        state = torch.random.get_rng_state()
        try:
            network = source.build(shape)
        finally:
            torch.random.set_rng_state(state)  # checking must not move the seeded RNG
    try:
        with torch.no_grad():
            logits = network.eval()(torch.zeros(2, shape.in_channels, shape.image_size, shape.image_size))
    except Exception as error:
        raise SourceError(FIELD, f"{source.spec} cannot take {shape.in_channels}x{shape.image_size}x{shape.image_size} "
                                 f"images: {type(error).__name__}: {error}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, shape.num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SourceError(FIELD, f"{source.spec} gives outputs of shape {got} for 2 images; it must give "
                                 f"logits of shape (2, {shape.num_classes})")


def stored_source(metadata: dict) -> tuple[ModelSource, InputShape]:
    """The source and shape a stored model records (models stored before sources existed are CNNs)."""
    record = metadata.get("model_source")
    arch = metadata.get("architecture")
    if record is None:
        return (ModelSource(hidden_units=arch["hidden_units"]),
                InputShape(arch["in_channels"], arch["image_size"], arch["num_classes"]))
    shape = InputShape(**record["shape"])
    hidden = arch["hidden_units"] if arch else 128
    return ModelSource(spec=record["spec"], args=record.get("args") or {}, hidden_units=hidden), shape


def rebuild(metadata: dict, allowed: ModelSource | None, name: str = "this model") -> nn.Module:
    """The network of a stored model, ready for its weights.

    The CNN and torchvision's models are rebuilt from the record alone. User code is imported
    only when `allowed` (the running command's own `model`) names the same spec: a registry
    entry never makes lr-sweep run code. Any source whose code digest differs from the record
    is refused, naming both digests."""
    source, shape = stored_source(metadata)
    if source.kind == "cnn":
        return build_model(metadata["architecture"])
    recorded = metadata["model_source"].get("code_digest")
    if source.kind == "user" and (allowed is None or allowed.spec != source.spec):
        named = "no user model" if allowed is None or allowed.kind != "user" else f"--model {allowed.spec}"
        raise ModelCodeChanged(
            f"{name} was built by user code {source.spec!r}, and this command names {named}: lr-sweep imports "
            f"user code only when the command's own config names it (--model {source.spec} or LR_SWEEP_MODEL)")
    current = source.digest()
    if current != recorded:
        raise ModelCodeChanged(f"the model code changed since {name} was trained: {source.spec} was "
                               f"{recorded}, it is {current} now; rebuild it with the code it was trained with")
    return source.build(shape)
