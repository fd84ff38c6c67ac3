"""Models of the ``singd`` command and of ``benchmarks/step_time.py``.

Every model but :func:`resnet` is built only from ``Conv2d``/``Linear`` (which SINGD
and KFAC train) and parameter-free layers (``ReLU``, pooling, ``Flatten``), so one
Kronecker optimizer trains all of its parameters and the comparison with SGD/AdamW is
fair. :func:`resnet` (torchvision's ResNet-18 in plain ``torch.nn``, BatchNorm
included) is the model users compile (``tests/test_compile_model.py``,
``benchmarks/compile_model.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

#: Channel plan of :func:`vgg_cnn`: numbers are 3×3 convolutions, ``"M"`` is 2×2 max-pooling.
#: A VGG-11-like plan at a quarter of the width; five poolings take 32×32 to 1×1.
VGG_PLAN: tuple[int | str, ...] = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M")


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A small CNN for 1×8×8 images: two convolutions and two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def vgg_cnn(
    num_classes: int = 100,
    in_channels: int = 3,
    plan: Sequence[int | str] = VGG_PLAN,
    width: float = 1.0,
    hidden: int = 256,
) -> nn.Sequential:
    """A VGG-style CNN for 32×32 images (3×3 convolutions, max-pooling, two linear layers).

    Args:
        num_classes: Outputs of the last layer.
        in_channels: Image channels.
        plan: Convolution widths and ``"M"`` pooling markers; the default pools five
            times, so a 32×32 input ends as ``C×1×1``.
        width: Multiplies every convolution width (e.g. 4.0 gives VGG-11's widths).
        hidden: Width of the hidden linear layer.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    pools = 0
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            pools += 1
            continue
        assert isinstance(item, int)
        out = max(1, round(item * width))
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
        channels = out
    side = 32 // 2**pools
    layers += [
        nn.Flatten(),
        nn.Linear(channels * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)


def image_cnn(image_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """The model ``singd train``/``compare`` use for a dataset's image shape.

    8×8 single-channel images (digits) get :func:`digits_cnn`; 32×32 images (CIFAR)
    get :func:`vgg_cnn`.

    Raises:
        ValueError: For other image shapes.
    """
    C, H, W = image_shape
    if (H, W) == (8, 8):
        model = digits_cnn(num_classes)
        if C != 1:
            model[0] = nn.Conv2d(C, 16, 3, padding=1)
        return model
    if (H, W) == (32, 32):
        return vgg_cnn(num_classes, in_channels=C)
    raise ValueError(f"No model for {C}×{H}×{W} images (supported: 8×8 and 32×32).")


def mlp(sizes: Sequence[int] = (784, 512, 512, 10)) -> nn.Sequential:
    """A ReLU MLP with the given layer sizes (input first, output last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def tokenwise_mlp(features: int = 128, hidden: int = 256, num_classes: int = 10) -> nn.Sequential:
    """An MLP applied to every position of a ``[batch, length, features]`` sequence.

    ``nn.Linear`` acts on the last dimension, so each token is processed
    independently and the layers share their weights over positions (SINGD's
    weight-sharing case, KFAC-expand).
    """
    return mlp((features, hidden, hidden, num_classes))


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block (torchvision's ``BasicBlock``)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet(
    widths: Sequence[int] = (64, 128, 256, 512),
    blocks: Sequence[int] = (2, 2, 2, 2),
    num_classes: int = 1000,
    imagenet_stem: bool = True,
) -> nn.Sequential:
    """A ResNet of :class:`BasicBlock` stages; the defaults are torchvision's resnet18.

    Args:
        widths: Channels of each stage (every stage after the first halves the side).
        blocks: Blocks per stage.
        num_classes: Outputs of the linear head.
        imagenet_stem: The 7×7 stride-2 convolution and max-pooling of ImageNet models;
            otherwise one 3×3 convolution (small images).
    """
    stem: list[nn.Module] = (
        [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)]
        if imagenet_stem
        else [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
    )
    stem += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    if imagenet_stem:
        stem.append(nn.MaxPool2d(3, 2, 1))
    stages: list[nn.Module] = []
    channels = widths[0]
    for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        stage = []
        for j in range(count):
            stage.append(BasicBlock(channels, width, 2 if i > 0 and j == 0 else 1))
            channels = width
        stages.append(nn.Sequential(*stage))
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*stem, *stages, *head)
