"""Operations per training step of the *published* ``singd`` on ``op_count``'s scenarios.

Issue 12 quotes the published package's counts on the CNN only; this worker counts its
training steps on both scenarios of :mod:`benchmarks.op_count` (the VGG-style CNN and
the 24-layer MLP) the same way: every ATen operation below autograd of one refresh step
(zero_grad, forward, backward, ``step()``; T = 1, after one warm-up step). On the CNN it
reproduces the issue's figures exactly (704, 2260, 2972, 732, 606). It imports nothing
but torch and the public API both packages share, so it runs under the published
package's own interpreter (never installed into this project)::

    python -m venv /tmp/published && /tmp/published/bin/pip install torch==2.13.0 singd==0.0.5
    /tmp/published/bin/python benchmarks/published_ops.py          # prints JSON

``python benchmarks/op_count.py --published-python /tmp/published/bin/python`` adds the
figures as a column. The published code has no device-dependent branches, so its CPU
count is its GPU count.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

#: op_count's labels → (published structure names, kfac_like): every structure the
#: published optimizer accepts (its rank-1 triangular classes are not among them).
PUBLISHED_NAMES: dict[str, tuple[tuple[str, str], bool]] = {
    "INGD": (("dense", "dense"), False),
    "IKFAC": (("dense", "dense"), True),
    "SINGD-diagonal": (("diagonal", "diagonal"), False),
    "SINGD-block_diagonal(30)": (("block30diagonal", "block30diagonal"), False),
    "SINGD-hierarchical(15, 15)": (("hierarchical15_15", "hierarchical15_15"), False),
    "SINGD-tril_toeplitz": (("triltoeplitz", "triltoeplitz"), False),
    "SINGD-triu_toeplitz": (("triutoeplitz", "triutoeplitz"), False),
}


def issue_cnn(num_classes: int = 100) -> nn.Sequential:
    """The VGG-style CNN of issue 12: 3×3 convolutions (padding 1) 3→32→32, max-pool,
    32→64→64, max-pool, 64→128, max-pool, Linear 2048→256→classes, ReLUs (the model of
    ``op_count.issue_cnn``, written with torch alone; a test checks they agree)."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (32, 32, "M", 64, 64, "M", 128, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(width, int)
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    layers += [nn.Flatten(), nn.Linear(2048, 256), nn.ReLU(), nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)


def deep_mlp(depth: int = 24, width: int = 64, num_classes: int = 10) -> nn.Sequential:
    """``depth`` equal ``Linear(width, width)`` layers, each followed by tanh, and a
    ``Linear(width, num_classes)`` read-out (the issue's 24-layer MLP)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


#: Scenario name → (model, per-sample input shape, classes), batch 32 (op_count's).
SCENARIOS: dict[str, tuple[Any, tuple[int, ...], int]] = {
    "cnn": (issue_cnn, (3, 32, 32), 100),
    "mlp24": (deep_mlp, (64,), 10),
}


def count(scenario: str, structures: tuple[str, str], kfac_like: bool) -> int:
    """Operations of one refresh step (T = 1) of the published SINGD on ``scenario``,
    with ``op_count.build``'s hyper-parameters."""
    from singd.optim.optimizer import SINGD

    make, input_shape, num_classes = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = make()
    options: dict[str, Any] = {"lr": 1e-3, "lr_cov": 1e-2, "T": 1, "damping": 0.1}
    if kfac_like:
        options["alpha1"] = 0.0
    optimizer = SINGD(model, structures=structures, kfac_like=kfac_like, **options)
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(32, *input_shape, generator=generator)
    y = torch.randint(num_classes, (32,), generator=generator)
    loss_func = nn.CrossEntropyLoss()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_func(model(X), y).backward()
        optimizer.step()

    train_step()  # warm-up
    with _Counter() as counter:
        train_step()
    return counter.ops


def main() -> int:
    counts = {
        scenario: {label: count(scenario, *spec) for label, spec in PUBLISHED_NAMES.items()}
        for scenario in SCENARIOS
    }
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
