"""The seed's way: the sweep as the project's first version ran it, for the GPU check to beat.

A plain PyTorch loop per learning rate: torchvision's FashionMNIST Dataset with ToTensor +
Normalize, a DataLoader (shuffled, `num_workers=4`, pinned memory), the same CNN (models/cnn.py),
batch, epochs and Adam as the default sweep; a validation pass per epoch; a W&B offline run per
rate with its per-epoch metrics and the trained model logged as an artifact. Same train/validation
split as lr-sweep's (tasks.data.dataset.split_indices). Prints one JSON line: the wall time and
what it trained.

    python -m benchmarks.seed_way --data-dir DATA --device cuda --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import wandb
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from flows.config import SweepConfig
from models.cnn import architecture, build_model
from tasks.data.dataset import split_indices

DEFAULTS = SweepConfig()
# Fashion-MNIST's training-set mean and standard deviation, as the seed hard-coded them.
MEAN, STD = (0.2860,), (0.3530,)


def loaders(data_dir: Path, batch_size: int, num_workers: int, pin: bool, train_limit: int | None) -> tuple[DataLoader, DataLoader]:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    full = datasets.FashionMNIST(str(data_dir), train=True, download=False, transform=transform)
    train_idx, val_idx = split_indices(len(full), 10000, DEFAULTS.split_seed, train_limit)
    common = {"num_workers": num_workers, "pin_memory": pin, "persistent_workers": num_workers > 0}
    return (DataLoader(Subset(full, train_idx.tolist()), batch_size=batch_size, shuffle=True, **common),
            DataLoader(Subset(full, val_idx.tolist()), batch_size=1000, **common))


def train_rate(rate: float, args, train: DataLoader, val: DataLoader, out: Path) -> int:
    """One learning rate, one W&B run, one model artifact; the images trained."""
    run = wandb.init(mode="offline", dir=str(out), project="seed-way", name=f"lr{rate:g}", reinit="create_new",
                     config={"learning_rate": rate, "epochs": args.epochs, "batch_size": args.batch_size})
    torch.manual_seed(0)
    model = build_model(architecture(DEFAULTS.hidden_units)).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=rate)
    images = 0
    for epoch in range(args.epochs):
        model.train()
        for data, target in train:
            data, target = data.to(args.device, non_blocking=True), target.to(args.device, non_blocking=True)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data), target)
            loss.backward()
            optimizer.step()
            images += len(data)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for data, target in val:
                data, target = data.to(args.device, non_blocking=True), target.to(args.device, non_blocking=True)
                correct += (model(data).argmax(1) == target).sum().item()
                total += len(target)
        run.log({"epoch": epoch + 1, "train_loss": loss.item(), "val_accuracy": correct / total})
    path = out / f"model-lr{rate:g}.pt"
    torch.save(model.state_dict(), path)
    artifact = wandb.Artifact(f"seed-way-lr{rate:g}", type="model")
    artifact.add_file(str(path))
    run.log_artifact(artifact)
    run.finish()
    return images


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULTS.data_dir), help="Holds FashionMNIST/raw. Default: %(default)s.")
    parser.add_argument("--device", default="cuda", help="Default: %(default)s.")
    parser.add_argument("--out", required=True, help="Folder for the W&B runs and the models.")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=DEFAULTS.learning_rates)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--train-limit", type=int, default=None, help="Train on at most this many images (smoke runs).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, val = loaders(Path(args.data_dir), args.batch_size, args.num_workers, args.device.startswith("cuda"), args.train_limit)
    images = sum(train_rate(rate, args, train, val, out) for rate in args.learning_rates)
    print(json.dumps({"seconds": time.perf_counter() - started, "images": images, "learning_rates": args.learning_rates,
                      "epochs": args.epochs, "num_workers": args.num_workers, "device": args.device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
