"""The CUDA paths of training, evaluation and device slots; skipped where no CUDA GPU is
(`gpu` marker, tests/conftest.py). On a GPU node: `pytest -m gpu`.

The packed engine's tests (`test_engine_*`) import only torch and the pure-torch modules, so
they run on a GPU machine that has nothing else installed:
    python3 -m pytest -p no:cacheprovider -c /dev/null --noconftest tests/test_gpu.py -k engine
"""

import math
import threading
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from models.cnn import architecture, build_model
from tasks.training.determinism import configure_determinism, shuffle
from tasks.training.packing import MemberStart, PackedTrainer, measure_pack

# Before anything here initialises CUDA: cuBLAS reads its workspace setting once.
configure_determinism(True)

pytestmark = pytest.mark.gpu


@pytest.fixture
def dataset(synthetic_data_dir):
    pytest.importorskip("prefect")  # the trial's own path: the whole project installed
    from tasks.data.prepare import prepare_dataset

    return prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)


def spec(**overrides):
    from tests.helpers import trial_spec

    return trial_spec(**overrides)


def test_training_on_cuda_learns_and_its_weights_measure_the_same(dataset):
    from tasks.data.prepare import load_splits, tensor_batches
    from tasks.evaluation.evaluate import eval_batch_size, measure, place_model
    from tasks.training.devices import trial_stream
    from tasks.training.train import train_trial

    splits = load_splits(dataset, "cuda:0")
    with trial_stream("cuda:0"):
        result = train_trial(spec(epochs=3), splits, "cuda:0")
    assert result.history[-1]["val_accuracy"] > 0.8 and result.samples_per_second > 0
    model = place_model(build_model(architecture(16)), "cuda:0")
    model.load_state_dict(result.state_dict)
    assert measure(model, tensor_batches(splits.val_x, splits.val_y, eval_batch_size(splits.device)))[1] == result.history[-1]["val_accuracy"]


def test_resume_on_cuda_equals_an_uninterrupted_run(dataset, tmp_path):
    """Exact: with deterministic algorithms cuDNN and cuBLAS pick the same kernels every time."""
    from tasks.data.prepare import load_splits
    from tasks.training.train import train_trial

    splits = load_splits(dataset, "cuda:0")
    full = train_trial(spec(epochs=3), splits, "cuda:0")
    train_trial(spec(epochs=2), splits, "cuda:0", checkpoint_dir=tmp_path)
    resumed = train_trial(spec(epochs=3), splits, "cuda:0", checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    for key in full.state_dict:
        assert torch.equal(full.state_dict[key], resumed.state_dict[key]), key


def test_trials_sharing_a_gpu_run_on_streams_of_their_own(dataset):
    from tasks.data.prepare import load_splits
    from tasks.training.devices import DeviceSlots, resolve_devices, trial_stream
    from tasks.training.train import train_trial

    devices = resolve_devices("cuda")
    slots = DeviceSlots(devices, 2)
    splits = load_splits(dataset, devices[0])
    results, taken = [], []

    def trial(seed):
        with slots.take() as device, trial_stream(device):
            taken.append(device)
            results.append(train_trial(spec(seed=seed), load_splits(dataset, device), device))

    threads = [threading.Thread(target=trial, args=(seed,)) for seed in range(2 * len(devices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 * len(devices) and set(taken) == set(devices)
    assert all(r.history[-1]["val_accuracy"] > 0.5 for r in results)
    assert splits.train_x.is_cuda


# --- the packed engine on CUDA: CUDA graphs, packs, exact resume (torch alone) --------------------

DEVICE = "cuda:0"


@dataclass(frozen=True)
class EngineSpec:
    """What the engine reads of a trial (a TrialSpec without pydantic): its rate, its seed and
    the fields of its training group, which this object holds itself."""

    learning_rate: float = 0.003
    seed: int = 0
    epochs: int = 2
    batch_size: int = 32
    optimizer: str = "adam"
    weight_decay: float | None = None
    precision: str = "fp32"
    dropout: float = 0.0

    @property
    def training(self) -> "EngineSpec":
        return self


class NormDropNet(nn.Module):
    """BatchNorm, Dropout and a non-persistent buffer: what a pack must carry per member."""

    def __init__(self, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8 * 7 * 7, 10)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, images):
        x = torch.relu(self.norm(self.conv(images))) * self.scale
        return self.head(self.drop(nn.functional.max_pool2d(x, 4).flatten(1)))


def build(spec: EngineSpec) -> nn.Module:
    torch.manual_seed(spec.seed)
    model = NormDropNet(spec.dropout) if spec.dropout else build_model(architecture(16))
    return model.to(device=DEVICE, memory_format=torch.channels_last)


def bars(count: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable images on the GPU: class k is a bright bar at row 2k + 4 (tests/conftest.py's)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.randint(0, 60, (count, 1, 28, 28), generator=generator).float()
    for row in range(3):
        images[torch.arange(count), 0, 2 * labels + 4 + row, 4:24] = 250
    images = (images / 255 - 0.2) / 0.3
    return images.to(DEVICE).contiguous(memory_format=torch.channels_last), labels.to(DEVICE)


def eager_alone(spec: EngineSpec, images, labels) -> dict[str, torch.Tensor]:
    """The trial alone as tasks/train.py trains it: its seeded order, fused torch.optim.Adam."""
    model = build(spec)
    decay = {} if spec.weight_decay is None else {"weight_decay": spec.weight_decay}
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate, fused=True, **decay)
    for epoch in range(1, spec.epochs + 1):
        order = shuffle(spec.seed, epoch, len(labels), DEVICE)
        for start in range(0, len(order), spec.batch_size):
            batch = order[start:start + spec.batch_size]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def engine(specs, images, labels, graphs=True) -> PackedTrainer:
    return PackedTrainer([build(s) for s in specs], specs, images, labels, graphs=graphs)


def pack_specs(**shared) -> list[EngineSpec]:
    return [EngineSpec(learning_rate=0.001, seed=0, **shared), EngineSpec(learning_rate=0.003, seed=1, **shared),
            EngineSpec(learning_rate=0.0005, seed=2, weight_decay=0.001, **shared)]


def close(first: dict, second: dict, tolerance: float) -> float:
    assert set(first) == set(second)
    difference = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    assert difference < tolerance, difference
    return difference


@pytest.fixture
def full_fp32():
    """fp32 convolutions without TF32 (cuDNN's default): the packed (grouped) and the single
    convolutions then round alike to ~1e-7, instead of TF32's ~1e-3 which Adam's normalised steps
    carry into 1e-2 of weight within two epochs (measured on an H200)."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


def test_engine_graph_trains_as_eager_on_cuda(full_fp32):
    images, labels = bars()
    spec = EngineSpec(learning_rate=0.001)  # at 0.003 Adam carried rounding to 3.7e-4 (H200)
    pack = engine([spec], images, labels)
    assert pack.engine == "graph", pack.graph_error
    trained = pack.train()[0]
    close(trained.state_dict, eager_alone(spec, images, labels), 1e-4)
    eager = engine([spec], images, labels, graphs=False)
    assert eager.engine == "eager"
    close(trained.state_dict, eager.train()[0].state_dict, 1e-5)


def test_engine_packed_graph_members_train_as_each_trial_alone_on_cuda(full_fp32):
    images, labels = bars()
    specs = pack_specs()
    pack = engine(specs, images, labels)
    assert pack.engine == "packed+graph", pack.graph_error
    for spec, member in zip(specs, pack.train()):
        close(member.state_dict, eager_alone(spec, images, labels), 1e-4)


def test_engine_packed_graph_resume_is_exact_on_cuda():
    """BatchNorm and Dropout under the graph: a pack stopped after epoch 1 and continued from its
    members' state equals the uninterrupted pack bit for bit."""
    images, labels = bars()
    specs = pack_specs(dropout=0.3, epochs=3)
    full = engine(specs, images, labels).train()
    first = engine(specs, images, labels)
    stopped = first.train(stop_at=1)
    again = engine(specs, images, labels)
    for index, member in enumerate(stopped):
        again.load_member(index, member.state_dict, first.optimizer_state(index))
    resumed = again.train([MemberStart(epoch=1, history=m.history) for m in stopped])
    for whole, part in zip(full, resumed):
        assert part.history == whole.history
        for key in whole.state_dict:
            assert torch.equal(whole.state_dict[key], part.state_dict[key]), key


def test_engine_two_packed_graph_runs_are_bit_identical_on_cuda():
    images, labels = bars()
    # BatchNorm and Dropout in fp32; the CNN in bf16 (BatchNorm under vmap and bf16 autocast
    # fails in torch 2.11's backward: such a model trains unpacked, tests/test_packing.py)
    for precision, dropout in (("fp32", 0.3), ("bf16", 0.0)):
        specs = pack_specs(dropout=dropout, precision=precision)
        first, second = engine(specs, images, labels).train(), engine(specs, images, labels).train()
        for a, b in zip(first, second):
            assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict), precision


def test_engine_bf16_packed_graph_learns_on_cuda():
    images, labels = bars()
    val_images, val_labels = bars(500, seed=1)
    specs = pack_specs(precision="bf16", epochs=3)
    pack = engine(specs, images, labels)
    assert pack.engine == "packed+graph", pack.graph_error
    results = pack.train(evaluate=lambda forward: measure_pack(forward, [(val_images, val_labels)]))
    assert all(r.history[-1]["val_accuracy"] > 0.8 and math.isfinite(r.history[-1]["train_loss"]) for r in results)


# --- a pack of real trials on CUDA (tasks/training/packed.py; needs the project installed) --------

def test_a_pack_on_cuda_trains_each_member_as_the_trial_alone(dataset, full_fp32):
    from tasks.data.prepare import load_splits
    from tasks.training.packed import train_pack
    from tasks.training.train import train_trial

    splits = load_splits(dataset, DEVICE)
    specs = [spec(learning_rate=rate, seed=seed) for rate, seed in ((0.001, 0), (0.003, 1), (0.0005, 2))]
    run = train_pack(specs, splits, DEVICE, graphs=True)
    assert run.engine == "packed+graph", run.reason
    for member_spec, member in zip(specs, run.results):
        close(member.state_dict, train_trial(member_spec, splits, DEVICE).state_dict, 1e-4)


def test_a_packed_graph_resumes_from_its_members_checkpoints_exactly_on_cuda(dataset, tmp_path):
    from tasks.data.prepare import load_splits
    from tasks.training.packed import train_pack

    splits = load_splits(dataset, DEVICE)
    specs = [spec(learning_rate=rate, seed=seed, epochs=3) for rate, seed in ((0.001, 0), (0.003, 1))]
    folders = [tmp_path / member.name for member in specs]
    full = train_pack(specs, splits, DEVICE, graphs=True)
    train_pack(specs, splits, DEVICE, folders, stop_at=2, graphs=True)  # "killed" after epoch 2
    resumed = train_pack(specs, splits, DEVICE, folders, graphs=True)
    for whole, part in zip(full.results, resumed.results):
        assert part.resumed_from == 2 and part.history == whole.history
        assert all(torch.equal(whole.state_dict[k], part.state_dict[k]) for k in whole.state_dict)
