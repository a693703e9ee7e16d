import pytest
import torch

from tasks.data.builtin import CHECKSUM_FILE, locate_dataset, raw_dir
from tasks.data.dataset import split_indices
from tasks.data.prepare import load_splits, prepare_dataset
from tasks.data.spec import DatasetError
from tests.conftest import make_idx_dataset


def test_reads_idx_files_written_by_the_test(synthetic_data_dir):
    ref = prepare_dataset("mnist", synthetic_data_dir, val_size=100, split_seed=0, train_limit=None,
                          allow_download=False)
    assert (ref.train_size, ref.val_size, ref.test_size) == (500, 100, 200)
    splits = load_splits(ref, "cpu")
    assert splits.train_x.shape == (500, 1, 28, 28) and splits.train_x.dtype == torch.float32
    assert splits.val_x.shape == (100, 1, 28, 28)
    assert splits.test_y.shape == (200,)
    # normalised with the training split's statistics
    assert abs(splits.train_x.mean().item()) < 1e-3
    assert abs(splits.train_x.std().item() - 1) < 1e-2


def test_splits_are_loaded_once_per_process(synthetic_data_dir):
    ref = prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)
    assert load_splits(ref, "cpu") is load_splits(ref, "cpu")


def test_fingerprint_changes_with_the_bytes(tmp_path):
    make_idx_dataset(tmp_path / "a" / "MNIST" / "raw", seed=1)
    make_idx_dataset(tmp_path / "b" / "MNIST" / "raw", seed=1)
    make_idx_dataset(tmp_path / "c" / "MNIST" / "raw", seed=2)
    fingerprints = [locate_dataset("mnist", tmp_path / name, allow_download=False)[1] for name in "abc"]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_split_is_fixed_by_its_seed_and_disjoint():
    train, val = split_indices(1000, 100, split_seed=5, train_limit=None)
    again_train, again_val = split_indices(1000, 100, split_seed=5, train_limit=None)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert len(train) == 900
    limited, same_val = split_indices(1000, 100, split_seed=5, train_limit=50)
    assert torch.equal(limited, train[:50]) and torch.equal(same_val, val)


def test_corrupted_file_is_a_clear_error(synthetic_data_dir):
    locate_dataset("mnist", synthetic_data_dir, allow_download=False)  # records SHA256SUMS
    directory = raw_dir("mnist", synthetic_data_dir)
    assert (directory / CHECKSUM_FILE).exists()
    target = directory / "train-images-idx3-ubyte"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="do not match SHA256SUMS"):
        locate_dataset("mnist", synthetic_data_dir, allow_download=False)


def test_missing_dataset_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        locate_dataset("kmnist", tmp_path, allow_download=False)


def test_system_archives_are_decompressed_where_torchvision_looks(tmp_path, monkeypatch):
    from tasks.data import builtin as data

    system = tmp_path / "system"
    make_idx_dataset(system, compress=True)
    # These archives are not the published files: neither MD5 nor known SHA-256 matches.
    monkeypatch.setitem(data.SYSTEM_DIRS, "kmnist", [system])
    with pytest.raises(DatasetError, match="corrupt"):
        locate_dataset("kmnist", tmp_path / "data", allow_download=False)
    # Declared as known, they are accepted and decompressed into DATA_DIR/KMNIST/raw.
    import gzip
    import hashlib
    known = {p.name[:-3]: hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest() for p in system.iterdir()}
    monkeypatch.setitem(data.KNOWN_RAW_SHA256, "kmnist", known)
    root, _ = locate_dataset("kmnist", tmp_path / "data", allow_download=False)
    assert sorted(p.name for p in raw_dir("kmnist", root).iterdir() if not p.name.startswith(".")) == sorted(
        [*known, CHECKSUM_FILE])


def test_first_install_from_several_processes_at_once_is_whole(tmp_path, monkeypatch):
    """Two containers on one fresh data volume decompressed into the same temporary
    names at once; the install now happens under a file lock, once."""
    import gzip
    import hashlib
    import multiprocessing

    from tasks.data import builtin as data

    system = tmp_path / "system"
    make_idx_dataset(system, train=3000, test=500, compress=True)
    known = {p.name[:-3]: hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest() for p in system.iterdir()}
    monkeypatch.setitem(data.SYSTEM_DIRS, "kmnist", [system])
    monkeypatch.setitem(data.KNOWN_RAW_SHA256, "kmnist", known)
    context = multiprocessing.get_context("fork")  # the children see the patched tables
    barrier = context.Barrier(4)

    def install():
        barrier.wait()
        locate_dataset("kmnist", tmp_path / "data", allow_download=False)

    processes = [context.Process(target=install) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    directory = raw_dir("kmnist", tmp_path / "data")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()
            if p.name in known} == known
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_real_fashion_mnist_is_verified(fashion_data_dir):
    ref = prepare_dataset("fashion-mnist", fashion_data_dir, 10000, 0, None, allow_download=False)
    assert (ref.train_size, ref.val_size, ref.test_size) == (50000, 10000, 10000)
    assert len(ref.fingerprint) == 64


def test_a_dry_run_installs_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Issue 29: `lr-sweep run --dry-run` decompressed the system's archives into the data
    directory and left its lock file there. Now it reads them from a scratch folder."""
    import gzip
    import hashlib

    from flows.cli import main
    from tasks.data import builtin as data

    system = tmp_path / "system"
    make_idx_dataset(system, train=300, test=100, compress=True)
    known = {p.name[:-3]: hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest() for p in system.iterdir()}
    monkeypatch.setitem(data.SYSTEM_DIRS, "kmnist", [system])
    monkeypatch.setitem(data.KNOWN_RAW_SHA256, "kmnist", known)
    arguments = ["run", "--dry-run", "--dataset", "kmnist", "--val-size", "50", "--data-dir", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "runs"), "--registry-dir", str(tmp_path / "registry")]
    assert main(arguments) == 0
    assert "250 training images" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system"]
    installed = prepare_dataset("kmnist", tmp_path / "data", 50, 0, None, allow_download=False)
    before = sorted(p for p in (tmp_path / "data").rglob("*"))
    assert main(arguments) == 0 and sorted(p for p in (tmp_path / "data").rglob("*")) == before
    assert installed.fingerprint == prepare_dataset("kmnist", tmp_path / "data", 50, 0, None, write=False).fingerprint
