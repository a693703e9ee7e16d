"""The image-folder cache's rules: images decoded and resized one by one, a pixel
limit, the cache written only from the bytes that were fingerprinted and only once every check has
passed, symbolic links followed each folder once, GIFs read, a full disk refused. Small synthetic
folders written here with PIL and torchvision."""

import os
from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main
from tasks.data import imagefolder
from tasks.data.prepare import load_splits, prepare_dataset, store_dataset
from tasks.data.spec import DatasetInputError
from tests.helpers import CLASSES, write_folder
from tests.test_data_inputs import assert_refused_at_prepare
from tests.test_inputs import snapshot


def test_an_image_over_the_pixel_limit_is_refused_naming_the_field_and_the_file(tmp_path, capsys):
    """Before, a decompression bomb was decoded whole: there was no limit."""
    write_folder(tmp_path / "images", {"train": 2, "test": 1}, sizes=((8, 8), (20, 20)))
    assert_refused_at_prepare(f"imagefolder:{tmp_path / 'images'}", tmp_path, "max_image_pixels",
                              "train/cat/001.png has 20x20 = 400 pixels, over max_image_pixels 100", capsys,
                              max_image_pixels=100, image_size=8)


def test_each_image_is_resized_as_it_is_decoded(tmp_path):
    """Memory is the cache's size: no image is kept at its native size (992 MB for a
    small test folder, decoded whole before the resize)."""
    root = write_folder(tmp_path / "images", {"train": 2, "test": 1}, sizes=((64, 48),))
    paths = [path for entries in imagefolder.scan_folder(root).files.values() for path, _ in entries]
    images, _ = imagefolder.decode_files(root, paths, imagefolder.Decoding(4, 10**8), num_workers=0)
    assert {tuple(image.shape) for image in images} == {(3, 4, 4)}


def test_a_file_changed_after_its_fingerprint_is_never_cached_under_it(tmp_path, monkeypatch):
    """A sync still running: the file changes between the fingerprint and the decode. Before, its
    new pixels were cached under the old bytes' fingerprint."""
    root = write_folder(tmp_path / "images", {"train": 2, "test": 1})
    fingerprint = imagefolder.folder_fingerprint

    def then_changed(scan):
        digest = fingerprint(scan)
        Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "train" / "dog" / "001.png")
        return digest

    monkeypatch.setattr(imagefolder, "folder_fingerprint", then_changed)
    with pytest.raises(DatasetInputError, match="its files changed while they were read"):
        prepare_dataset(f"imagefolder:{root}", tmp_path / "data", None, 0, None)
    assert not (tmp_path / "data").exists()


def test_a_dry_run_and_a_refused_run_write_no_cache(tmp_path, capsys):
    """Before, both wrote the decoded images to DATA_DIR/imagefolder-cache."""
    root = write_folder(tmp_path / "images", {"train": 2, "test": 1})
    model = tmp_path / "wrong.py"
    model.write_text("import torch\n\n\ndef build(**_):\n    return torch.nn.Linear(5, 3)\n")
    common = ["--dataset", f"imagefolder:{root}", "--data-dir", str(tmp_path / "data"), "--output-dir",
              str(tmp_path / "runs"), "--registry-dir", str(tmp_path / "registry"), "--val-size", "1"]
    assert main(["run", "--dry-run", *common]) == 0
    assert main(["run", "--dry-run", *common, "--model", f"{model}:build"]) == 2
    assert "model" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    assert main(["data", "--dataset", f"imagefolder:{root}", "--data-dir", str(tmp_path / "data"),
                 "--val-size", "1"]) == 0  # checked: `lr-sweep data` writes it, as a run past its checks
    ref = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", 1, 0, None)
    assert imagefolder.cache_file(tmp_path / "data", ref.fingerprint, None).is_file()


def test_a_symlink_cycle_is_refused_naming_the_link(tmp_path, capsys):
    """Before, os.walk followed it: 40 files became 1,640 entries, 800 of them mislabelled."""
    root = write_folder(tmp_path / "images", {"train": 2, "test": 1})
    os.symlink("../..", root / "train" / "cat" / "loop")
    assert_refused_at_prepare(f"imagefolder:{root}", tmp_path, "dataset",
                              "train/cat/loop links to a folder above it", capsys)


def test_a_file_reached_by_two_links_counts_once_and_never_in_two_classes(tmp_path):
    root = write_folder(tmp_path / "images", {"train": 3, "test": 1})
    plain = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", 1, 0, None)
    (root / "train" / "cat" / "sub").mkdir()
    (root / "train" / "cat" / "002.png").rename(root / "train" / "cat" / "sub" / "002.png")
    os.symlink("sub", root / "train" / "cat" / "again")  # the same folder twice
    os.symlink("sub/002.png", root / "train" / "cat" / "same.png")  # the same file twice
    linked = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", 1, 0, None)
    assert linked.train_size == plain.train_size == 8
    os.symlink("../cat/sub/002.png", root / "train" / "dog" / "cat.png")
    with pytest.raises(DatasetInputError, match="same file in two classes of train/"):
        prepare_dataset(f"imagefolder:{root}", tmp_path / "data", 1, 0, None)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_gif_images_count(tmp_path, mode, channels):
    """docs/data.md says GIFs count; before, they were skipped and the folder refused as empty."""
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            (tmp_path / "gifs" / split / name).mkdir(parents=True)
            for index in range(2):
                Image.new(mode, (6, 6), (40 * label, 9 * index, 200)[:len(mode)]).save(tmp_path / "gifs" / split / name / f"{index}.gif")
    ref = prepare_dataset(f"imagefolder:{tmp_path / 'gifs'}", tmp_path / "data", 1, 0, None)
    assert (ref.channels, ref.height, ref.train_size, ref.test_size) == (channels, 6, 5, 6)
    assert load_splits(ref, "cpu").train_x.shape == (5, channels, 6, 6)


def full_disk(tmp_path: Path, monkeypatch) -> None:
    """The cache's temporary file is a link to /dev/full: a real ENOSPC on the first write."""
    link = tmp_path / "full"
    monkeypatch.setattr(imagefolder, "temporary_sibling", lambda path: link.symlink_to("/dev/full") or link)


def test_a_full_disk_while_writing_the_cache_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """Before: a traceback (OSError: No space left on device), and the cache's folders left."""
    root = write_folder(tmp_path / "images", {"train": 2, "test": 1})
    ref = prepare_dataset(f"imagefolder:{root}", tmp_path / "data", 1, 0, None)
    (tmp_path / "data").mkdir()
    before = snapshot(tmp_path)
    full_disk(tmp_path, monkeypatch)
    with pytest.raises(DatasetInputError) as caught:
        store_dataset(ref)
    assert caught.value.field == "data_dir" and "no space left" in str(caught.value)
    assert snapshot(tmp_path) == before and not (tmp_path / "data" / imagefolder.CACHE_FOLDER).exists()
    assert Path("/dev/full").is_char_device()
