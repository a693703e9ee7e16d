"""Data sources beyond the built-ins: image folders (decoded once into a cache), dataset
functions returning tensors or Datasets (resident and DataLoader paths), and the batches the
training loop and the evaluation read. Small data written by the tests themselves."""

import math
import textwrap

import pytest
import torch
from torchvision.io import write_png

from tasks.data import function as user_data
from tasks.data import imagefolder
from tasks.data.builtin import read_raw
from tasks.data.dataset import DatasetRef
from tasks.data.prepare import eval_batches, load_splits, prepare_dataset, rescaling, store_dataset, train_batches
from tests.conftest import make_idx_dataset
from tests.helpers import CLASSES, class_image, write_folder


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = imagefolder.decode_image_bytes

    def counted(data, name, decoding):
        calls.append(name)
        return real(data, name, decoding)

    monkeypatch.setattr(imagefolder, "decode_image_bytes", counted)
    return calls


def test_an_rgb_folder_of_mixed_sizes_with_image_size_and_its_own_val_folder(tmp_path):
    root = write_folder(tmp_path / "pets", {"train": 4, "val": 2, "test": 2}, sizes=((8, 8), (12, 10)))
    ref = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", None, 0, None, image_size=8)
    assert (ref.source, ref.name, ref.channels, ref.height, ref.width, ref.image_size) == ("imagefolder", "pets", 3, 8, 8, 8)
    assert (ref.num_classes, ref.class_names, ref.val_folder) == (3, CLASSES, True)
    assert (ref.train_size, ref.val_size, ref.test_size) == (12, 6, 6)
    assert len(ref.mean) == len(ref.std) == 3
    metadata = ref.as_metadata()
    assert metadata["class_names"] == list(CLASSES) and metadata["mean"] == list(ref.mean)
    assert not {"root", "spec", "data_dir", "resident", "num_workers", "max_image_pixels"} & set(metadata)
    splits = load_splits(ref, "cpu")
    assert splits.train_x.shape == (12, 3, 8, 8) and splits.val_x.shape == (6, 3, 8, 8)
    assert sorted(splits.val_y.tolist()) == [0, 0, 1, 1, 2, 2] and splits.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    # normalised per channel with the training images' statistics
    per_channel = splits.train_x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(dim=1).abs().max() < 1e-5
    assert (per_channel.std(dim=1) - 1).abs().max() < 1e-3


def test_a_grey_folder_keeps_its_pixels_and_splits_validation_from_train(tmp_path):
    root = write_folder(tmp_path / "grey", {"train": 6, "test": 2}, channels=1, sizes=((28, 28),))
    ref = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", None, 0, None)
    assert (ref.channels, ref.image_size, ref.val_folder, ref.val_size, ref.train_size) == (1, 28, False, 3, 15)
    splits = load_splits(ref, "cpu")
    # test images in file order: class 0's first image is 000.png, unchanged by the round trip
    raw = splits.test_x[0] * ref.std[0] + ref.mean[0]
    assert torch.allclose(raw * 255, class_image(0, 400, 1, (28, 28)).float(), atol=1e-3)


def test_the_cache_is_written_once_and_read_by_later_prepares(tmp_path, count_decodes):
    root = write_folder(tmp_path / "pets", {"train": 3, "test": 1})
    spec, data_dir = f"imagefolder:{root}", tmp_path / "data"
    first = prepare_dataset(spec, data_dir, 2, 0, None)
    assert len(count_decodes) == 12
    cache = imagefolder.cache_file(data_dir, first.fingerprint, None)
    assert not data_dir.exists()  # written once every check has passed, not by the prepare
    store_dataset(first)
    assert len(count_decodes) == 12 and cache.is_file() and not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]
    written = cache.stat().st_mtime_ns
    second = prepare_dataset(spec, data_dir, 2, 0, None)  # another trial or sweep on this data dir
    load_splits(second, "cpu")
    assert second == first and len(count_decodes) == 12  # nothing decoded again
    assert cache.stat().st_mtime_ns == written
    resized = prepare_dataset(spec, data_dir, 2, 0, None, image_size=4)  # another size: its own file
    load_splits(resized, "cpu")  # a trial writes it when the run's checks have not
    assert len(count_decodes) == 24 and resized.fingerprint == first.fingerprint
    assert imagefolder.cache_file(data_dir, first.fingerprint, 4).is_file()


def test_the_fingerprint_changes_when_a_file_changes(tmp_path, count_decodes):
    root = write_folder(tmp_path / "pets", {"train": 3, "test": 1})
    spec, data_dir = f"imagefolder:{root}", tmp_path / "data"
    before = prepare_dataset(spec, data_dir, 2, 0, None)
    image = class_image(1, 7)
    image[0, 0, 0] ^= 1  # one pixel of one file
    write_png(image, str(root / "train" / "dog" / "001.png"))
    changed = prepare_dataset(spec, data_dir, 2, 0, None)
    assert changed.fingerprint != before.fingerprint and len(count_decodes) == 24
    (root / "train" / "dog" / "001.png").rename(root / "train" / "dog" / "renamed.png")  # same bytes, new name
    assert prepare_dataset(spec, data_dir, 2, 0, None).fingerprint not in (before.fingerprint, changed.fingerprint)


def test_cached_tensors_survive_a_damaged_cache_file(tmp_path, count_decodes):
    root = write_folder(tmp_path / "pets", {"train": 2, "test": 1})
    ref = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", 1, 0, None)
    store_dataset(ref)
    imagefolder.cache_file(tmp_path / "data", ref.fingerprint, None).write_bytes(b"not safetensors")
    assert prepare_dataset(f"imagefolder:{root}", tmp_path / "data", 1, 0, None) == ref
    load_splits(ref, "cpu")
    assert len(count_decodes) == 18  # decoded again and rewritten
    assert imagefolder.cache_file(tmp_path / "data", ref.fingerprint, None).read_bytes() != b"not safetensors"


# --- dataset functions ---------------------------------------------------------------------------

DATA_MODULE = '''
import os

import torch

CLASSES = ("zero", "one", "two", "three")


def images(count, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 4
    pixels = torch.randint(0, 50, (count, 3, 6, 6), dtype=torch.uint8, generator=generator)
    for index, label in enumerate(labels.tolist()):
        pixels[index, :, label] = 240
    return pixels, labels


def tensors():
    train_x, train_y = images(60, int(os.environ.get("DATA_SEED", "0")))
    test_x, test_y = images(12, 1)
    return train_x, train_y, test_x, test_y, CLASSES


class Pairs(torch.utils.data.Dataset):
    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.pixels[index], int(self.labels[index])


def datasets():
    return Pairs(*images(60, 0)), Pairs(*images(12, 1)), CLASSES
'''


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    path = tmp_path / "user" / "mydata.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(DATA_MODULE))
    monkeypatch.setattr(user_data, "_results", {})  # each test calls the function afresh
    return path


def test_a_function_returning_tensors_takes_the_resident_path(tmp_path, data_module):
    ref = prepare_dataset(f"{data_module}:tensors", tmp_path / "data", None, 0, None)
    assert (ref.source, ref.name, ref.resident, ref.channels, ref.image_size) == ("function", "mydata-tensors", True, 3, 6)
    assert (ref.train_size, ref.val_size, ref.test_size, ref.num_classes) == (50, 10, 12, 4)
    assert ref.class_names == ("zero", "one", "two", "three")
    assert ref.as_metadata()["code_digest"] == ref.code_digest and len(ref.code_digest) == 64
    splits = load_splits(ref, "cpu")
    assert splits.train_x.shape == (50, 3, 6, 6) and splits.train_size == 50


def test_the_fingerprint_of_a_function_covers_its_code_and_its_data(tmp_path, data_module, monkeypatch):
    first = prepare_dataset(f"{data_module}:tensors", tmp_path / "data", None, 0, None)
    monkeypatch.setattr(user_data, "_results", {})
    data_module.write_text(data_module.read_text() + "\n# a comment: the same data, other code\n")
    recoded = prepare_dataset(f"{data_module}:tensors", tmp_path / "data", None, 0, None)
    assert recoded.fingerprint != first.fingerprint and recoded.code_digest != first.code_digest
    monkeypatch.setattr(user_data, "_results", {})
    monkeypatch.setenv("DATA_SEED", "1")  # the same code, other data
    redata = prepare_dataset(f"{data_module}:tensors", tmp_path / "data", None, 0, None)
    assert redata.fingerprint != recoded.fingerprint and redata.code_digest == recoded.code_digest


def test_a_function_returning_small_datasets_is_materialised_like_tensors(tmp_path, data_module):
    tensors = prepare_dataset(f"{data_module}:tensors", tmp_path / "data", None, 0, None)
    datasets = prepare_dataset(f"{data_module}:datasets", tmp_path / "data", None, 0, None, num_workers=0)
    assert datasets.resident and datasets.mean == tensors.mean and datasets.class_names == tensors.class_names
    a, b = load_splits(tensors, "cpu"), load_splits(datasets, "cpu")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y) and torch.equal(a.test_x, b.test_x)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_too_large_for_memory_is_read_by_a_dataloader_in_the_same_order(tmp_path, data_module,
                                                                                 monkeypatch, workers):
    resident = load_splits(prepare_dataset(f"{data_module}:tensors", tmp_path / "data", 8, 3, 40), "cpu")
    monkeypatch.setattr(user_data, "RESIDENT_LIMIT_BYTES", 0)
    ref = prepare_dataset(f"{data_module}:datasets", tmp_path / "data", 8, 3, 40, num_workers=workers)
    assert not ref.resident and ref.num_workers == workers
    assert (ref.mean, ref.std, ref.train_size, ref.val_size) == (resident.dataset.mean, resident.dataset.std, 40, 8)
    assert ref.fingerprint != resident.dataset.fingerprint  # another function, the same numbers
    splits = load_splits(ref, "cpu")
    assert splits.train_x is None and splits.train_size == 40
    order = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    for (x, y), (rx, ry) in zip(train_batches(splits, order, 16), train_batches(resident, order, 16), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert x.is_contiguous(memory_format=torch.channels_last)
    for which in ("val", "test"):
        got = list(eval_batches(splits, which, 5))
        expected = list(eval_batches(resident, which, 5))
        assert len(got) == len(expected)
        assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(got, expected))


def test_resident_batches_are_index_slices_of_the_split(synthetic_data_dir):
    splits = load_splits(prepare_dataset("mnist", synthetic_data_dir, None, 0, None, allow_download=False), "cpu")
    order = torch.randperm(splits.train_size, generator=torch.Generator().manual_seed(0))
    batches = list(train_batches(splits, order, 64))
    assert len(batches) == math.ceil(splits.train_size / 64)
    for step, (x, y) in enumerate(batches):
        index = order[64 * step:64 * (step + 1)]
        assert torch.equal(x, splits.train_x[index]) and torch.equal(y, splits.train_y[index])
    test = list(eval_batches(splits, "test", 64))
    assert torch.equal(torch.cat([x for x, _ in test]), splits.test_x)
    with pytest.raises(ValueError, match="'val' or 'test'"):
        next(eval_batches(splits, "train", 64))


# --- the built-ins stay what they were ------------------------------------------------------------

def flat_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """The normalisation constants as they were computed before they were per channel."""
    count, total, squares = images.numel(), 0.0, 0.0
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += block.sum().item()
        squares += block.square_().sum().item()
    mean = total / count
    return mean, math.sqrt((squares - count * mean * mean) / (count - 1))


def test_the_built_ins_are_normalised_bit_for_bit_as_before(synthetic_data_dir):
    ref = prepare_dataset("mnist", synthetic_data_dir, None, 0, None, allow_download=False)
    assert ref.val_size == 100  # one sixth of 600, as 10,000 is of the 60k
    from tasks.data.dataset import split_indices

    images, _ = read_raw("mnist", synthetic_data_dir, train=True)
    train_idx, _ = split_indices(len(images), 100, 0, None)
    mean, std = (round(v, 6) for v in flat_statistics(images[train_idx]))
    assert (ref.mean, ref.std) == ((mean,), (std,))
    before = images[train_idx].float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)  # the old arithmetic
    after = load_splits(ref, "cpu").train_x
    assert torch.equal(after, before)
    assert (ref.channels, ref.image_size, ref.num_classes, ref.class_names) == (1, 28, 10, None)


def test_a_built_in_resized_with_image_size(synthetic_data_dir):
    ref = prepare_dataset("mnist", synthetic_data_dir, None, 0, None, allow_download=False, image_size=32)
    assert (ref.image_size, ref.resize, ref.as_metadata()["resize"]) == (32, 32, 32)
    splits = load_splits(ref, "cpu")
    assert splits.train_x.shape == (500, 1, 32, 32) and splits.test_x.shape == (200, 1, 32, 32)


def test_val_size_is_checked_against_the_training_images(tmp_path):
    make_idx_dataset(tmp_path / "MNIST" / "raw", train=60, test=10)
    assert prepare_dataset("mnist", tmp_path, None, 0, None, allow_download=False).val_size == 10
    assert prepare_dataset("mnist", tmp_path, 59, 0, None, allow_download=False).train_size == 1


def test_rescaling_maps_each_channel_and_reads_models_stored_with_one_float():
    ref = DatasetRef(name="x", root="/", fingerprint="f", val_size=1, split_seed=0, train_limit=None,
                     train_size=1, test_size=1, mean=(0.5, 0.25), std=(0.2, 0.5), channels=2)
    assert rescaling(ref, {"mean": [0.5, 0.25], "std": [0.2, 0.5]}) is None
    scale, shift = rescaling(ref, {"mean": [0.5, 0.5], "std": [0.4, 0.5]})
    raw = torch.rand(3, 2, 4, 4)
    data = (raw - torch.tensor(ref.mean).view(1, 2, 1, 1)) / torch.tensor(ref.std).view(1, 2, 1, 1)
    model = (raw - torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)) / torch.tensor([0.4, 0.5]).view(1, 2, 1, 1)
    assert torch.allclose(data * scale + shift, model, atol=1e-6)
    grey = DatasetRef(name="x", root="/", fingerprint="f", val_size=1, split_seed=0, train_limit=None,
                      train_size=1, test_size=1, mean=(0.3,), std=(0.2,))
    assert rescaling(grey, {"mean": 0.3, "std": 0.2}) is None  # a model stored before: one float each


def test_a_trial_trains_on_an_image_folder(tmp_path):
    """Ten grey 28x28 classes in PNG files: the reference CNN trains on them as on the built-ins."""
    from flows.config import SweepConfig
    from flows.plan import trial_specs
    from tasks.training.train import train_trial

    for split, count in (("train", 12), ("test", 3)):
        for label in range(10):
            (tmp_path / "digits" / split / f"c{label}").mkdir(parents=True)
            for index in range(count):
                image = torch.randint(0, 60, (1, 28, 28), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(100 * label + index))
                image[:, 2 * label + 4:2 * label + 7, 4:24] = 250
                write_png(image, str(tmp_path / "digits" / split / f"c{label}" / f"{index}.png"))
    config = SweepConfig(dataset=f"imagefolder:{tmp_path / 'digits'}", learning_rates=[0.003], epochs=3,
                         batch_size=16, train_limit=100, data_dir=tmp_path / "data", device="cpu")
    ref = prepare_dataset(config.dataset, config.data_dir, config.val_size, config.split_seed, config.train_limit)
    assert (ref.train_size, ref.val_size, ref.num_classes) == (100, 20, 10)
    result = train_trial(trial_specs(config)[0], load_splits(ref, "cpu"), "cpu")
    assert result.history[-1]["val_accuracy"] > 0.5 and math.isfinite(result.history[-1]["train_loss"])


def test_a_stored_models_data_is_prepared_again_only_as_the_command_names_it(tmp_path, synthetic_data_dir):
    from tasks.data.prepare import prepare_recorded
    from tasks.data.spec import DatasetInputError

    builtin = prepare_dataset("mnist", synthetic_data_dir, 50, 3, 200, allow_download=False)
    assert prepare_recorded(builtin.as_metadata(), "fashion-mnist", synthetic_data_dir) == builtin  # by its name
    root = write_folder(tmp_path / "pets", {"train": 3, "val": 1, "test": 1})
    folder = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", None, 0, None, image_size=4)
    again = prepare_recorded(folder.as_metadata(), f"imagefolder:{root}", tmp_path / "data")
    assert again == folder
    with pytest.raises(DatasetInputError, match="trained on imagefolder data 'pets': give that data as --dataset"):
        prepare_recorded(folder.as_metadata(), "fashion-mnist", tmp_path / "data")


def test_rescaling_a_model_stored_with_one_float_each():
    grey = DatasetRef(name="x", root="/", fingerprint="f", val_size=1, split_seed=0, train_limit=None,
                      train_size=1, test_size=1, mean=(0.3,), std=(0.2,))
    from tasks.evaluation.evaluate import rescaling as evaluation_rescaling

    for scale, shift in (rescaling(grey, {"mean": 0.25, "std": 0.4}),
                         evaluation_rescaling(grey, {"fingerprint": "f", "mean": 0.25, "std": 0.4})):
        assert torch.allclose(scale.flatten(), torch.tensor([0.5])) and torch.allclose(shift.flatten(), torch.tensor([0.125]))


def test_a_sweep_of_an_rgb_image_folder_trains_evaluates_and_promotes(prefect_server, tmp_path):
    """One tiny sweep end to end: PNG files of two sizes resized to 8x8, three RGB classes, the
    reference CNN built for them; the fetched models are evaluated by digest and the best one takes
    the alias, its class names stored with it."""
    from flows.sweep import lr_sweep
    from models.local_registry import LocalRegistry
    from tests.helpers import smoke_config

    root = write_folder(tmp_path / "my pets", {"train": 8, "test": 2}, sizes=((8, 8), (10, 12)))
    config = smoke_config(tmp_path, tmp_path / "data", dataset=f"imagefolder:{root}", image_size=8,
                          val_size=None, train_limit=16, learning_rates=[0.01, 0.001], batch_size=8)
    summary = lr_sweep(config=config)
    assert summary["promotion"]["promoted"] and summary["dataset"]["train_size"] == 16
    holder = LocalRegistry(config.registry_dir).resolve("my-pets-cnn", "production")
    dataset = LocalRegistry(config.registry_dir).fetch(holder).metadata["dataset"]
    assert dataset["class_names"] == list(CLASSES) and (dataset["channels"], dataset["height"]) == (3, 8)
    assert all(t["status"] == "completed" and t["evaluation"]["val_accuracy"] == t["history"][-1]["val_accuracy"]
               for t in summary["trials"])


def test_worker_processes_decode_a_folder_as_this_process_does(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "pets", {"train": 5, "test": 2}, sizes=((8, 8), (10, 12)))
    scan = imagefolder.scan_folder(root)
    decoding = imagefolder.Decoding(8, 10**8)
    here, fingerprint = imagefolder.decode_folder(scan, decoding, num_workers=0)
    assert fingerprint == imagefolder.folder_fingerprint(scan)  # the digest of the bytes decoded
    monkeypatch.setattr(imagefolder, "PARALLEL_FROM", 0)
    monkeypatch.setattr(imagefolder, "DECODE_BATCH", 4)  # batches of one shape and of two
    there = imagefolder.decode_folder(scan, decoding, num_workers=2)[0]
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)
    (root / "test" / "dog" / "001.png").write_bytes(b"not an image")
    with pytest.raises(imagefolder.DatasetInputError, match="cannot read image test/dog/001.png"):
        imagefolder.decode_folder(imagefolder.scan_folder(root), decoding, num_workers=2)
