"""The reference CNN of the sweep: two conv layers, one hidden layer, ten classes.

After pytorch/examples mnist/main.py (conv-conv-hidden-out), made smaller for speed: 16 and 32
channels, padding 1 and a 2x2 max-pool after each conv, so the hidden layer sees 32x7x7 features.
Measured on a 2-core CPU (batch 64, channels_last): 3,670 images/s for this net against 1,650 for
32/64 channels and 740 for the example's unpooled 32/64 layout; Fashion-MNIST test accuracy stays
above 0.90 after 5 epochs.

ReLUs run in place: no extra activation-sized tensor each, same values and gradients. Measured on
2 cores: evaluation 24,900 against 11,600 images/s, training within noise, weights bit-identical.

The network is built from a small, JSON-serialisable architecture dict alone, so that a stored
model can be rebuilt from its metadata on any machine (see `architecture` / `build_model`).
"""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURE_NAME = "cnn"


def architecture(hidden_units: int, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> dict:
    """The description stored with every model; `build_model` turns it back into a network."""
    return {
        "name": ARCHITECTURE_NAME,
        "in_channels": in_channels,
        "image_size": image_size,
        "conv_channels": [16, 32],
        "hidden_units": hidden_units,
        "num_classes": num_classes,
    }


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, image_size: int, conv_channels: list[int], hidden_units: int, num_classes: int):
        super().__init__()
        first, second = conv_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat = second * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden_units),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_units, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def build_model(arch: dict) -> SmallCNN:
    if arch.get("name") != ARCHITECTURE_NAME:
        raise ValueError(f"unknown architecture {arch.get('name')!r}; this build knows {ARCHITECTURE_NAME!r}")
    return SmallCNN(
        in_channels=arch["in_channels"],
        image_size=arch["image_size"],
        conv_channels=list(arch["conv_channels"]),
        hidden_units=arch["hidden_units"],
        num_classes=arch["num_classes"],
    )
