"""torchvision's resnet18 and a timm ViT (tiny inputs, random init, CPU).

Skipped where torchvision cannot be imported: PyPI's torchvision wheels are built for
one torch release and fail to import beside another (``operator torchvision::nms does
not exist``), as beside the torch 2.13.0 CPU build that CI installs. To run them:
``pip install torch==2.14.1 torchvision==0.29.1 timm`` in a separate environment, then
``pip install -e ".[test]"`` and ``python -m pytest tests/test_vision.py``
(docs/integrations.md).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import pytest
import torch
from torch import nn

from singd import SINGD
from tests.tolerances import CHANNELS_LAST_FLOAT64


def import_or_skip(name: str) -> ModuleType:
    """``pytest.importorskip`` that also skips on a broken install (not only ImportError)."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # a mismatched torchvision raises RuntimeError at import
        pytest.skip(f"{name} cannot be imported: {type(error).__name__}: {error}")


def images(n: int, size: int = 32, classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(4, 3, size, size, generator=gen),
            torch.randint(0, classes, (4,), generator=gen),
        )
        for _ in range(n)
    ]


def train(model: nn.Module, optim: SINGD, data, channels_last: bool = False) -> list[float]:
    losses = []
    for X, y in data:
        if channels_last:
            X = X.contiguous(memory_format=torch.channels_last)
        optim.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


# Dense K over a 512·3·3 = 4608-dimensional patch is 85 MB per layer: diagonal factors
# keep this test small; the structure does not change what is registered.
RESNET = {"lr": 1e-2, "T": 1, "structures": ("diagonal", "diagonal"), "lr_cov": 1e-2}


def resnet18() -> nn.Module:
    models = import_or_skip("torchvision.models")
    torch.manual_seed(0)
    return models.resnet18(num_classes=10)


def test_resnet18_registers_every_conv_and_linear_and_trains_batchnorm() -> None:
    model = resnet18()
    optim = SINGD(model, **RESNET)
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(optim.layers) == convs and len(convs) == 21
    batchnorm = [
        p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    ]
    assert batchnorm and all(p in optim._registry.fallback_group for p in batchnorm)
    running = model.bn1.running_mean.clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="singd")
        losses = train(model, optim, images(3))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(running, model.bn1.running_mean)  # BatchNorm in train mode


def test_resnet18_channels_last_follows_the_contiguous_run() -> None:
    """The two layouts run different convolution kernels: compared in float64, with the
    SGD fallback (AdamW's g/√v turns the round-off of BatchNorm biases whose gradient
    is ~0 into full-size steps, whatever the optimizer of the other layers)."""
    plain, last = resnet18().double(), resnet18().double()
    last = last.to(memory_format=torch.channels_last)
    data = [(X.double(), y) for X, y in images(2)]
    train(plain, SINGD(plain, fallback="sgd", **RESNET), data)
    train(last, SINGD(last, fallback="sgd", **RESNET), data, channels_last=True)
    assert last.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, p), q in zip(plain.named_parameters(), last.parameters(), strict=True):
        error = ((p - q).abs().max() / p.abs().max()).item()
        assert error <= CHANNELS_LAST_FLOAT64, (name, error)


def test_timm_vit_registers_its_linear_layers_and_learns() -> None:
    timm = import_or_skip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=10,
    )
    optim = SINGD(model, lr=5e-3, T=1, structures=("dense", "dense"))
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(optim.layers) == linears  # qkv, proj, fc1, fc2, head, patch_embed.proj
    X, y = images(1)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="singd")
        losses = train(model, optim, [(X, y)] * 8)  # one batch, memorised
    assert losses[-1] < 0.5 * losses[0], losses
