"""`make bench-data`: an image folder through lr-sweep's cache against a plain ImageFolder loop.

One run, on Fashion-MNIST written once as PNG files in torchvision's ImageFolder layout
(DATA_DIR/fashion-mnist-png/{train,test}/<k>-<class>/<index>.png, from the IDX files of
Debian's dataset-fashion-mnist), the reference CNN, the same seed, the same learning rate:

1. lr-sweep: `prepare_dataset("imagefolder:...")` from a cold cache (fingerprint of the 70,000
   files, decode once, write DATA_DIR/imagefolder-cache/...), then `load_splits` (resident on
   the device) and `train_trial` for EPOCHS epochs; and the warm prepare a later sweep pays
   (fingerprint, cached tensors read);
2. the loop a user would write: `torchvision.datasets.ImageFolder` (PIL decode, ToTensor,
   Normalize with the same constants) + `DataLoader(batch 64, shuffle, num_workers=2)` over the
   same training split, decoding every epoch, validated each epoch through a DataLoader too.

Each epoch's time covers its training and its validation pass, in both; the data path alone (one
epoch of batches, no model) is timed too, for each. Printed: per-epoch
times, the ratios (per epoch after the first; and all epochs with lr-sweep's cold prepare and
load counted in its first), both final validation accuracies; with `--models`, training images/s
of lr-sweep's own loop for the CNN and torchvision:resnet18, each in fp32 and --precision bf16.
Figures go to --json too.

    make bench-data
    .venv/bin/python -m flows.environment .venv/bin/python -m benchmarks.bench_data --help
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from flows.config import SweepConfig
from flows.plan import trial_specs
from models.cnn import architecture, build_model
from models.config import ModelConfig
from tasks.data import imagefolder
from tasks.data.builtin import locate_dataset, read_raw
from tasks.data.dataset import split_indices
from tasks.data.prepare import load_splits, locate, prepare_dataset, train_batches
from tasks.training.devices import configure_cpu_threads, resolve_devices
from tasks.training.train import train_trial

FASHION_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle_boot")
DONE = ".written"


def write_png_folder(data_dir: Path, folder: Path) -> float:
    """Fashion-MNIST's 70,000 images as PNG files, once (a marker file says the folder is whole)."""
    if (folder / DONE).exists():
        return 0.0
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import write_png

    started = time.perf_counter()
    root, _ = locate_dataset("fashion-mnist", data_dir)
    shutil.rmtree(folder, ignore_errors=True)
    for split, train in (("train", True), ("test", False)):
        images, labels = read_raw("fashion-mnist", root, train=train)
        for k, name in enumerate(FASHION_CLASSES):
            (folder / split / f"{k}-{name}").mkdir(parents=True, exist_ok=True)

        def write(index: int) -> None:
            label = int(labels[index])
            write_png(images[index].unsqueeze(0), str(folder / split / f"{label}-{FASHION_CLASSES[label]}" / f"{index:05d}.png"))

        with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool:
            list(pool.map(write, range(len(images)), chunksize=512))
    (folder / DONE).write_text("")
    return time.perf_counter() - started


def lr_sweep_path(spec, config: SweepConfig, device: str) -> dict:
    fingerprint = locate(config.dataset, config.data_dir).fingerprint  # to find its cache, without decoding
    shutil.rmtree(Path(config.data_dir) / imagefolder.CACHE_FOLDER / fingerprint, ignore_errors=True)
    started = time.perf_counter()
    ref = prepare_dataset(config.dataset, config.data_dir, config.val_size, config.split_seed, config.train_limit)
    prepare_cold = time.perf_counter() - started
    loaded = time.perf_counter()
    splits = load_splits(ref, device)
    load = time.perf_counter() - loaded
    warm = time.perf_counter()
    prepare_dataset(config.dataset, config.data_dir, config.val_size, config.split_seed, config.train_limit)
    prepare_warm = time.perf_counter() - warm
    order = torch.randperm(splits.train_size, generator=torch.Generator().manual_seed(0)).to(splits.device)
    started = time.perf_counter()
    count = sum(len(labels) for _, labels in train_batches(splits, order, spec.training.batch_size))
    synchronize(device)
    data_only = count / (time.perf_counter() - started)
    ends = []
    started = time.perf_counter()
    result = train_trial(spec, splits, device, on_epoch=lambda record: (synchronize(device), ends.append(time.perf_counter())))
    epochs = [b - a for a, b in zip([started, *ends], ends)]
    return {"prepare_cold_s": prepare_cold, "load_splits_s": load, "prepare_warm_s": prepare_warm,
            "epoch_s": epochs, "val_accuracy": result.history[-1]["val_accuracy"], "data_path_images_per_s": data_only,
            "train_size": ref.train_size, "val_size": ref.val_size, "mean": ref.mean, "std": ref.std,
            "fingerprint": ref.fingerprint}


def plain_loop(spec, folder: Path, mean: tuple, std: tuple, config: SweepConfig, device: str, workers: int) -> dict:
    """A DataLoader loop over torchvision's ImageFolder, as a user writes it: PIL decodes every
    image of every epoch (grey, as the files are), ToTensor and Normalize."""
    from PIL import Image
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    def grey(path: str):
        with open(path, "rb") as handle:
            return Image.open(handle).convert("L")

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    train_set = datasets.ImageFolder(str(folder / "train"), transform=transform, loader=grey)
    train_idx, val_idx = split_indices(len(train_set), config.val_size or len(train_set) // 6, config.split_seed,
                                       config.train_limit)
    cuda = device.startswith("cuda")
    train_loader = DataLoader(Subset(train_set, train_idx.tolist()), batch_size=spec.training.batch_size, shuffle=True,
                              num_workers=workers, pin_memory=cuda, generator=torch.Generator().manual_seed(spec.seed))
    val_loader = DataLoader(Subset(train_set, val_idx.tolist()), batch_size=1024, num_workers=workers, pin_memory=cuda)
    # The data path alone (decode, transform, collate), through a loader of its own: the training
    # loader's shuffle generator is left as it is.
    data_loader = DataLoader(Subset(train_set, train_idx.tolist()), batch_size=spec.training.batch_size, shuffle=True,
                             num_workers=workers, pin_memory=cuda, generator=torch.Generator().manual_seed(spec.seed))
    started = time.perf_counter()
    count = sum(len(labels) for _, labels in data_loader)
    data_only = count / (time.perf_counter() - started)
    torch.manual_seed(spec.seed)
    model = build_model(architecture(spec.network.hidden_units)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    epochs, accuracy = [], 0.0
    for _ in range(spec.training.epochs):
        started = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for images, labels in val_loader:
                correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
        accuracy = correct / len(val_idx)
        epochs.append(time.perf_counter() - started)
    return {"epoch_s": epochs, "val_accuracy": accuracy, "workers": workers, "data_path_images_per_s": data_only}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def engine_speed(spec, config: SweepConfig, device: str, train_limit: int, model: str | None = None,
                 precision: str = "fp32") -> float:
    """Training images/s of lr-sweep's own loop (`train_trial`'s samples_per_second: the steps of
    an epoch, validation left out) for one epoch of `train_limit` images, after one to warm up,
    with another model or precision."""
    ref = prepare_dataset(config.dataset, config.data_dir, 256, config.split_seed, train_limit)
    trial = spec.but(epochs=1, precision=precision)
    if model is not None:
        trial = trial.model_copy(update={"network": ModelConfig(model=model)})
    splits = load_splits(ref, device)
    train_trial(trial, splits, device)  # warm-up: the first steps of a network run slow
    return train_trial(trial, splits, device).samples_per_second


def model_speeds(spec, config: SweepConfig, device: str, train_limit: int) -> dict:
    small = max(256, train_limit // 8)  # resnet18 is ~20x slower than the CNN on a CPU
    return {
        "cnn_fp32": engine_speed(spec, config, device, train_limit),
        "cnn_bf16": engine_speed(spec, config, device, train_limit, precision="bf16"),
        "resnet18_fp32": engine_speed(spec, config, device, small, model="torchvision:resnet18"),
        "resnet18_bf16": engine_speed(spec, config, device, small, model="torchvision:resnet18", precision="bf16"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="holds the IDX files, the PNG folder and the cache")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: the first GPU, else the CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    parser.add_argument("--train-limit", type=int, default=None, help="train on this many images (a quick look)")
    parser.add_argument("--models", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torchvision:resnet18 and --precision bf16 (training images/s)")
    parser.add_argument("--model-images", type=int, default=4096,
                        help="training images of the one-epoch speed runs (the CNN; resnet18 an eighth)")
    parser.add_argument("--json", default=os.environ.get("BENCH_DATA_JSON", "bench-data.json"))
    parser.add_argument("--write-folder-only", action="store_true",
                        help="only write DATA_DIR/fashion-mnist-png (examples/imagefolder.md), measure nothing")
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir).resolve()
    folder = data_dir / "fashion-mnist-png"
    written = write_png_folder(data_dir, folder)
    if args.write_folder_only:
        print(f"{folder}: Fashion-MNIST as an image folder ({'written in %.1f s' % written if written else 'written before'})")
        return 0
    device = resolve_devices(args.device)[0]
    threads = configure_cpu_threads([device])
    config = SweepConfig(dataset=f"imagefolder:{folder}", data_dir=data_dir, epochs=args.epochs,
                         learning_rates=[0.001], train_limit=args.train_limit, device=device)
    spec = trial_specs(config)[0]
    print(f"device {device}, {threads} CPU thread(s), {os.cpu_count()} core(s); PNG folder {folder}"
          + (f" (written in {written:.1f} s)" if written else " (written before)"))
    ours = lr_sweep_path(spec, config, device)
    plain = plain_loop(spec, folder, ours["mean"], ours["std"], config, device, args.workers)

    ratios = [p / o for p, o in zip(plain["epoch_s"], ours["epoch_s"])]
    ours_total = ours["prepare_cold_s"] + ours["load_splits_s"] + sum(ours["epoch_s"])
    summary = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads, "device": device,
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "train_size": ours["train_size"], "val_size": ours["val_size"], "epochs": args.epochs,
        "png_write_s": written, "lr_sweep": ours, "plain_imagefolder": plain,
        "ratio_per_epoch": ratios, "ratio_after_first": ratios[1:],
        "ratio_including_decode": sum(plain["epoch_s"]) / ours_total,
        "val_accuracy_points_apart": 100 * abs(ours["val_accuracy"] - plain["val_accuracy"]),
    }
    print(f"{ours['train_size']:,} training / {ours['val_size']:,} validation images, batch {spec.training.batch_size}, "
          f"lr {spec.learning_rate:g}, seed {spec.seed}")
    print(f"lr-sweep: cold prepare {ours['prepare_cold_s']:.1f} s (fingerprint + decode + cache), load "
          f"{ours['load_splits_s']:.1f} s; warm prepare {ours['prepare_warm_s']:.1f} s")
    print(f"{'epoch':>5} {'lr-sweep s':>11} {'ImageFolder s':>14} {'ratio':>6}")
    for epoch, (a, b, r) in enumerate(zip(ours["epoch_s"], plain["epoch_s"], ratios), 1):
        print(f"{epoch:>5} {a:>11.1f} {b:>14.1f} {r:>5.2f}x")
    print(f"all epochs, lr-sweep's cold prepare and load counted: {summary['ratio_including_decode']:.2f}x "
          f"({ours_total:.1f} s against {sum(plain['epoch_s']):.1f} s)")
    print(f"the data path alone (one epoch of batches, no model): lr-sweep {ours['data_path_images_per_s']:,.0f} images/s, "
          f"ImageFolder + DataLoader({args.workers} workers) {plain['data_path_images_per_s']:,.0f} images/s")
    print(f"validation accuracy: lr-sweep {100 * ours['val_accuracy']:.2f}%, ImageFolder loop "
          f"{100 * plain['val_accuracy']:.2f}% ({summary['val_accuracy_points_apart']:.2f} points apart)")
    if args.models:
        speeds = model_speeds(spec, config, device, args.model_images)
        summary["training_images_per_s"] = speeds
        print("training images/s of lr-sweep's loop (one epoch, batch 64): "
              + ", ".join(f"{name} {value:,.0f}" for name, value in speeds.items()))
    Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
