"""A user's own model for lr-sweep: a small ResNet with BatchNorm (He et al. 2016, the CIFAR
variant's basic blocks, narrowed), built by a factory lr-sweep calls as

    small_resnet(num_classes=..., in_channels=..., image_size=..., **model_args)

Sweep it with

    lr-sweep run --model examples/resnet_model.py:small_resnet --model-args '{"width": 16}'

The file is loaded under a module name of its own, so this folder's names never clash with
lr-sweep's packages; it imports nothing but torch.
"""

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def small_resnet(num_classes: int, in_channels: int, image_size: int, width: int = 16, blocks: int = 1) -> nn.Module:
    """Three stages of `blocks` basic blocks (width, 2x, 4x channels; stride 2 between stages),
    global average pooling, one linear layer: any image size works."""
    layers = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    channels = width
    for stage, out in enumerate((width, 2 * width, 4 * width)):
        for index in range(blocks):
            layers.append(BasicBlock(channels, out, stride=2 if stage > 0 and index == 0 else 1))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
