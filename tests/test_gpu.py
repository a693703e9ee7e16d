"""The CUDA paths of training, evaluation and device slots; skipped where no CUDA GPU is
(`gpu` marker, tests/conftest.py). On a GPU node: `pytest -m gpu`."""

import threading

import pytest
import torch

from models.cnn import architecture, build_model
from tasks.data.prepare import load_splits, prepare_dataset, tensor_batches
from tasks.evaluation.evaluate import eval_batch_size, measure, place_model
from tasks.training.devices import DeviceSlots, resolve_devices, trial_stream
from tasks.training.train import train_trial
from tests.helpers import trial_spec

pytestmark = pytest.mark.gpu


@pytest.fixture
def dataset(synthetic_data_dir):
    return prepare_dataset("mnist", synthetic_data_dir, 100, 0, None, allow_download=False)


spec = trial_spec


def test_training_on_cuda_learns_and_its_weights_measure_the_same(dataset):
    splits = load_splits(dataset, "cuda:0")
    with trial_stream("cuda:0"):
        result = train_trial(spec(epochs=3), splits, "cuda:0")
    assert result.history[-1]["val_accuracy"] > 0.8 and result.samples_per_second > 0
    model = place_model(build_model(architecture(16)), "cuda:0")
    model.load_state_dict(result.state_dict)
    assert measure(model, tensor_batches(splits.val_x, splits.val_y, eval_batch_size(splits.device)))[1] == result.history[-1]["val_accuracy"]


def test_resume_on_cuda_equals_an_uninterrupted_run(dataset, tmp_path):
    splits = load_splits(dataset, "cuda:0")
    full = train_trial(spec(epochs=3), splits, "cuda:0")
    train_trial(spec(epochs=2), splits, "cuda:0", checkpoint_dir=tmp_path)
    resumed = train_trial(spec(epochs=3), splits, "cuda:0", checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2
    for key in full.state_dict:  # cuDNN may pick other kernels: close, not bit-identical
        torch.testing.assert_close(full.state_dict[key], resumed.state_dict[key], rtol=1e-4, atol=1e-5)


def test_trials_sharing_a_gpu_run_on_streams_of_their_own(dataset):
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
