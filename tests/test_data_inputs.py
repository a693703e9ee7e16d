"""Bad data input: refused before training with one line naming the field, nothing written.

The spec's form and the numbers are the config's; a folder or a function is looked at by the
data step itself (`prepare_dataset`, which `lr-sweep data` and the run's pre-flight call), which
raises DatasetInputError naming the field before it writes anything. Each case: exit 2 from
`lr-sweep run --dry-run`, the field named, the registry and the output parent unchanged."""

import textwrap
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from flows.cli import main
from models.local_registry import LocalRegistry
from tasks.data import function as user_data
from tasks.data.prepare import prepare_dataset
from tasks.data.spec import DatasetInputError
from tests.helpers import FASHION_COLLECTION, tiny_model
from tests.test_inputs import assert_refused, snapshot

CONFIG_INPUTS = [
    # (extra CLI arguments, environment, the field the message must name, a fragment of what is allowed)
    (["--dataset", "cifar10"], {}, "dataset", "imagefolder:PATH, package.module:function or path/to/file.py:function"),
    (["--dataset", "imagefolder:"], {}, "dataset", "needs the folder's path"),
    (["--dataset", "my data:load"], {}, "dataset", "package.module:function"),
    (["--dataset", "data.py"], {}, "dataset", "path/to/file.py:function"),
    ([], {"LR_SWEEP_DATASET": "imagenet"}, "dataset", "imagefolder:PATH"),
    (["--image-size", "0"], {}, "image_size", "greater than or equal to 1"),
    (["--image-size", "5000"], {}, "image_size", "less than or equal to 4096"),
    (["--image-size", "big"], {}, "image_size", "valid integer"),
    (["--num-workers", "-1"], {}, "num_workers", "greater than or equal to 0"),
    (["--val-size", "0"], {}, "val_size", "greater than or equal to 1"),
]


@pytest.fixture
def registry_with_production(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    registry.move_alias(registry.log_model(FASHION_COLLECTION, *tiny_model(0)), "production")
    return tmp_path / "registry"


@pytest.mark.parametrize("arguments, environment, field, allowed", CONFIG_INPUTS,
                         ids=[f"{f}-{i}" for i, (_, _, f, _) in enumerate(CONFIG_INPUTS)])
def test_bad_data_config_fails_early_and_changes_nothing(arguments, environment, field, allowed, tmp_path,
                                                         registry_with_production, monkeypatch, capsys):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    before = snapshot(tmp_path)
    code = main(["run", "--dry-run", "--registry-dir", str(registry_with_production),
                 "--output-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), *arguments])
    assert_refused(code, capsys.readouterr().err, field, allowed)
    assert snapshot(tmp_path) == before


def png(path: Path, size=(8, 8), channels: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.full((channels, *size), 128, dtype=torch.uint8), str(path))


def folder(root: Path, splits=("train", "test"), classes=("a", "b"), size=(8, 8)) -> Path:
    for split in splits:
        for name in classes:
            png(root / split / name / "0.png", size)
    return root


def no_train(root):
    folder(root, splits=("test",))


def no_test(root):
    folder(root, splits=("train",))


def no_classes(root):
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()


def no_images(root):
    folder(root)
    (root / "train" / "b" / "0.png").rename(root / "train" / "b" / "notes.txt")


def classes_differ(root):
    folder(root, splits=("train",), classes=("a", "b", "c"))
    folder(root, splits=("test",), classes=("a", "b", "d"))


def val_classes_differ(root):
    folder(root)
    folder(root, splits=("val",), classes=("a",))


def mixed_sizes(root):
    folder(root)
    png(root / "train" / "a" / "1.png", size=(9, 8))


def unreadable(root):
    folder(root)
    (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n then not a PNG at all")


FOLDER_CASES = [
    # (how the folder is made, extra prepare_dataset arguments, field, a fragment of the message)
    (lambda root: None, {}, "dataset", "is not a folder"),
    (no_train, {}, "dataset", "has no train/ folder"),
    (no_test, {}, "dataset", "has no test/ folder"),
    (no_classes, {}, "dataset", "train/ holds no class folders"),
    (no_images, {}, "dataset", "train/b/ holds no images"),
    (classes_differ, {}, "dataset", "the class folders of test/ differ from train/'s (missing: c) (not in train/: d)"),
    (val_classes_differ, {}, "dataset", "the class folders of val/ differ from train/'s (missing: b)"),
    (mixed_sizes, {}, "image_size", "has images of 2 sizes (8x8 (train/a/0.png), 9x8 (train/a/1.png)): give image_size N"),
    (unreadable, {}, "dataset", "cannot read image train/a/1.png"),
    (lambda root: folder(root, splits=("train", "val", "test")), {"val_size": 1}, "val_size", "own val/ images"),
    (folder, {"val_size": 2}, "val_size", "val_size 2 leaves no training images out of 2: give at most 1"),
]


def assert_refused_at_prepare(spec: str, tmp_path: Path, field: str, fragment: str, capsys, **arguments) -> None:
    """Refused by the data step, by `lr-sweep data` and by `lr-sweep run --dry-run` (exit 2, the
    field named); nothing written."""
    before = snapshot(tmp_path)
    options = {"val_size": None} | arguments
    with pytest.raises(DatasetInputError) as caught:
        prepare_dataset(spec, tmp_path / "data", options.pop("val_size"), 0, None, **options)
    assert caught.value.field == field
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    flags = [part for name, value in arguments.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    for command in (["data"], ["run", "--dry-run", "--output-dir", str(tmp_path / "runs"),
                               "--registry-dir", str(tmp_path / "registry")]):
        code = main([*command, "--dataset", spec, "--data-dir", str(tmp_path / "data"), *flags])
        assert_refused(code, capsys.readouterr().err, field, fragment)
    assert snapshot(tmp_path) == before  # nothing written: no cache, no lock, no data folder
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("make, arguments, field, fragment", FOLDER_CASES,
                         ids=[f"{f}-{i}" for i, (_, _, f, _) in enumerate(FOLDER_CASES)])
def test_a_bad_image_folder_is_refused_naming_the_field(make, arguments, field, fragment, tmp_path, capsys):
    make(tmp_path / "images")
    assert_refused_at_prepare(f"imagefolder:{tmp_path / 'images'}", tmp_path, field, fragment, capsys, **arguments)


FUNCTION_MODULE = '''
import torch

NOT_CALLABLE = 3


def images(count, dtype=torch.uint8):
    return torch.zeros(count, 1, 4, 4, dtype=dtype)


def raises():
    raise RuntimeError("no such bucket")


def a_dict():
    return {"train": 1}


def three():
    return images(4), torch.zeros(4, dtype=torch.int64), images(2)


def labels_short():
    return images(4), torch.zeros(3, dtype=torch.int64), images(2), torch.zeros(2, dtype=torch.int64)


def float_labels():
    return images(4), torch.zeros(4), images(2), torch.zeros(2, dtype=torch.int64)


def int_images():
    return images(4, torch.int32), torch.zeros(4, dtype=torch.int64), images(2), torch.zeros(2, dtype=torch.int64)


def other_test_size():
    return images(4), torch.zeros(4, dtype=torch.int64), torch.zeros(2, 1, 5, 5, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)


def too_few_names():
    return images(4), torch.arange(4), images(2), torch.zeros(2, dtype=torch.int64), ["a", "b"]


class Mixed(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.zeros(1, 4 + index % 2, 4, dtype=torch.uint8), 0


def mixed_datasets():
    return Mixed(), Mixed()


class WithNaN(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.full((1, 4, 4), float("nan") if index == 5 else 0.5), index % 2


def nan_datasets():
    return WithNaN(), WithNaN()
'''

FUNCTION_CASES = [
    # (function spec relative to the module file; None: the module itself is bad), field, fragment
    ("missing.py:load", "dataset", "does not exist"),
    ("no_such_package.loaders:load", "dataset", "no module named 'no_such_package'"),
    ("broken.py:load", "dataset", "failed: SyntaxError"),
    ("mydata.py:nowhere", "dataset", "has no 'nowhere'"),
    ("mydata.py:NOT_CALLABLE", "dataset", "is a int, not a function"),
    ("mydata.py:raises", "dataset", "the function raised RuntimeError: no such bucket"),
    ("mydata.py:a_dict", "dataset", "returned a dict; expected (train_images, train_labels, test_images, test_labels"),
    ("mydata.py:three", "dataset", "returned 3 value(s) of types Tensor, Tensor, Tensor"),
    ("mydata.py:labels_short", "dataset", "train labels must be integers, one per image (4)"),
    ("mydata.py:float_labels", "dataset", "train labels must be integers"),
    ("mydata.py:int_images", "dataset", "train images must be uint8 or float, got torch.int32"),
    ("mydata.py:other_test_size", "image_size", "train images are (1, 4, 4), test images (1, 5, 5)"),
    ("mydata.py:too_few_names", "dataset", "label 3 has no class name (2 given)"),
    ("mydata.py:mixed_datasets", "dataset", "give image_size N if its images differ in size"),
    ("mydata.py:nan_datasets", "dataset", "train images hold NaN or infinite pixels (first: image 5)"),
]


@pytest.mark.parametrize("spec, field, fragment", FUNCTION_CASES,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(FUNCTION_CASES)])
def test_a_bad_dataset_function_is_refused_naming_the_field(spec, field, fragment, tmp_path, monkeypatch, capsys):
    code = tmp_path / "code"
    code.mkdir()
    (code / "mydata.py").write_text(textwrap.dedent(FUNCTION_MODULE))
    (code / "broken.py").write_text("def load(:\n")
    monkeypatch.setattr(user_data, "_results", {})
    monkeypatch.setattr(user_data, "READ_BATCH", 4)
    spec = spec if spec.startswith("no_such") else f"{code}/{spec}"
    monkeypatch.chdir(tmp_path)
    assert_refused_at_prepare(spec, tmp_path, field, fragment, capsys, num_workers=0)


def test_nan_pixels_of_a_dataset_read_by_a_dataloader_are_refused(tmp_path, monkeypatch):
    """The DataLoader path (a Dataset too large for memory) reads the images once for their
    statistics: NaN pixels are refused there, as on the resident path."""
    (tmp_path / "mydata.py").write_text(textwrap.dedent(FUNCTION_MODULE))
    monkeypatch.setattr(user_data, "_results", {})
    monkeypatch.setattr(user_data, "READ_BATCH", 4)
    monkeypatch.setattr(user_data, "RESIDENT_LIMIT_BYTES", 0)
    with pytest.raises(DatasetInputError, match=r"train images hold NaN or infinite pixels \(first: image 5\)"):
        prepare_dataset(f"{tmp_path / 'mydata.py'}:nan_datasets", tmp_path / "data", 1, 0, None, num_workers=0)
