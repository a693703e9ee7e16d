"""Shared test set-up: quiet, local Prefect and W&B; synthetic and real data; a temporary
Prefect server.

The environment is set in `pytest_configure`, before any test module is imported, so before
anything imports Prefect or W&B (both read it at import).
"""

import gzip
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.environment import LOCAL_DEFAULTS

# The live W&B tests (tests/test_wandb_live.py) run with the key the caller gave; no other test
# sees it, so nothing else can reach a W&B server by accident.
LIVE_WANDB_API_KEY = os.environ.get("WANDB_API_KEY")


def pytest_configure(config):
    home = tempfile.mkdtemp(prefix="lr-sweep-tests-")
    os.environ.update(LOCAL_DEFAULTS | {
        "PREFECT_HOME": os.path.join(home, "prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "WANDB_CONFIG_DIR": os.path.join(home, "wandb-config"),
        "WANDB_CACHE_DIR": os.path.join(home, "wandb-cache"),
        "WANDB_DATA_DIR": os.path.join(home, "wandb-data"),
    })
    for variable in ("WANDB_API_KEY", "PREFECT_API_URL", "PREFECT_API_KEY"):
        os.environ.pop(variable, None)
    for variable in [v for v in os.environ if v.startswith("LR_SWEEP_")]:
        os.environ.pop(variable)

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An IDX file as torchvision reads it: magic (0x08 = ubyte, dims), sizes, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_idx_dataset(raw: Path, train: int = 600, test: int = 200, seed: int = 0, compress: bool = False) -> None:
    """A small learnable 10-class dataset: class k is a bright bar at row 2k plus noise."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 60, size=(count, 28, 28))
        for index, label in enumerate(labels):
            images[index, 2 * label + 4: 2 * label + 7, 4:24] = 250
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)


@pytest.fixture
def synthetic_data_dir(tmp_path: Path) -> Path:
    """A data directory holding small IDX files under the name 'mnist' (written by the test)."""
    make_idx_dataset(tmp_path / "data" / "MNIST" / "raw")
    return tmp_path / "data"


@pytest.fixture(scope="session")
def sweep_data_dir(tmp_path_factory) -> Path:
    """The flow tests' dataset: synthetic IDX files as 'mnist', 1,400 training and 300 test
    images, written once per session (no dataset package needed)."""
    directory = tmp_path_factory.mktemp("sweep-data")
    make_idx_dataset(directory / "MNIST" / "raw", train=1400, test=300)
    return directory


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory) -> Path:
    """The real Fashion-MNIST, decompressed once per test session from Debian's package (slow
    tests only; `make test-slow` and .ci/run install the package)."""
    if not SYSTEM_FASHION_MNIST.exists():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run does)")
    directory = tmp_path_factory.mktemp("fashion-data")
    from tasks.data.builtin import locate_dataset

    locate_dataset("fashion-mnist", directory, allow_download=False)
    return directory


# The session's Prefect server, launched when collection shows that a test needs it, so that it
# starts (about 10 s on 2 cores) while the tests that do not need it run first.
_session_server = None


def session_server():
    """The session's server, launched and recorded in its PREFECT_HOME as `lr-sweep run` records
    its own: the tests that call `lr-sweep run` reuse it rather than start a second server on
    the same SQLite database (two servers migrating one database at once fail to start)."""
    from flows import local_server

    return local_server.ensure_started(Path(os.environ["PREFECT_HOME"]))[0]


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (`prefect server start`, SQLite in the session's PREFECT_HOME),
    started once per session, as `lr-sweep run` starts its background server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import local_server
    from tests.stack import flush_prefect_workers

    server = _session_server or session_server()
    local_server.wait_until_healthy(server)
    flush_prefect_workers()  # none left bound to a server an earlier test used
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server
        flush_prefect_workers()  # the last logs and events, while the server still runs


@pytest.fixture(scope="session")
def smoke_sweep(prefect_server, sweep_data_dir, tmp_path_factory):
    """One small real sweep (2 learning rates, W&B offline, local registry), shared by the tests
    that read what a sweep leaves behind: (config, summary)."""
    from flows.sweep import lr_sweep
    from tests.helpers import smoke_config

    config = smoke_config(tmp_path_factory.mktemp("smoke"), sweep_data_dir)
    return config, lr_sweep(config=config)


@pytest.fixture
def report_server(monkeypatch):
    """W&B's report endpoints, faked behind autospec'd SDK objects; `wandb.Api()` returns them."""
    import wandb

    from tests.wandb_fakes import FakeReportServer

    server = FakeReportServer()
    monkeypatch.setattr(wandb, "Api", lambda *args, **kwargs: server.api)
    return server


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is; tests that need the Prefect server run last, and the
    server is launched now, so its start overlaps the others."""
    global _session_server
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    items.sort(key=lambda item: "prefect_server" in item.fixturenames)  # stable: file order otherwise
    if not config.option.collectonly and any("prefect_server" in item.fixturenames for item in items):
        _session_server = session_server()


def pytest_unconfigure(config):
    from flows import local_server

    # The recorded server is the session's (also when the session ends before the fixture ran),
    # or one `lr-sweep run` started (before its pre-flight) in a session without prefect_server.
    local_server.stop_recorded(Path(os.environ["PREFECT_HOME"]))
    if _session_server is not None:
        local_server.stop(_session_server)  # should its record have been replaced meanwhile


@pytest.fixture(autouse=True)
def _reset_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
