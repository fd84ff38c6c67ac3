"""Models, data and loops that several test modules share (test modules import only this,
``tests/cases.py``, ``tests/tolerances.py`` and the references, never each other)."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from singd.cli import main
from tests.tolerances import TRAJECTORY_FLOAT32, tolerance

# --- models ---------------------------------------------------------------------------------


def cnn(inplace: bool = False) -> nn.Sequential:
    """The small net of the published test suite, on 12×12 inputs (conv, two linears)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 5, stride=2, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 20),
        nn.ReLU(inplace=inplace),
        nn.Linear(20, 10),
    )


def twin_cnns(device: torch.device | str = "cpu") -> tuple[nn.Sequential, nn.Sequential]:
    """Two copies of :func:`cnn` with identical weights."""
    torch.manual_seed(0)
    a, b = cnn(), cnn()
    b.load_state_dict(a.state_dict())
    return a.to(device), b.to(device)


def net(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Conv, linear, LayerNorm (a fallback parameter), linear, on 6×6 inputs, 5 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).to(device=device, dtype=dtype)


#: Hyper-parameters :func:`net` trains well with in a few steps.
NET_HYPER = {"lr": 1e-2, "T": 2, "lr_cov": 5e-2, "damping": 1e-2}


class TransformerBlock(nn.Module):
    """Embedding → attention → MLP → tied output projection (a tiny language model)."""

    def __init__(self, vocab: int = 30, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied input and output embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h)


# --- data -----------------------------------------------------------------------------------


def batches(
    n: int, batch_size: int = 16, seed: int = 0, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 12×12 single-channel images and 10-class labels (for :func:`cnn`)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 1, 12, 12, generator=gen).to(device),
            torch.randint(0, 10, (batch_size,), generator=gen).to(device),
        )
        for _ in range(n)
    ]


def data(
    n: int, device: torch.device | str = "cpu", seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 12 6×6 images and 5-class labels (for :func:`net`)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(12, 1, 6, 6, generator=gen).to(device),
            torch.randint(0, 5, (12,), generator=gen).to(device),
        )
        for _ in range(n)
    ]


# --- loops and comparisons ------------------------------------------------------------------


def train(
    model: nn.Module,
    optim: torch.optim.Optimizer,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_scale: float = 1.0,
) -> None:
    """zero_grad, cross-entropy backward, step, for each batch."""
    for X, y in data:
        optim.zero_grad()
        (nn.functional.cross_entropy(model(X), y) * loss_scale).backward()
        optim.step()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's parameters."""
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(a: nn.Module, b: nn.Module, *, exact: bool = False) -> None:
    """Bitwise equal (``exact``) or equal to float32 trajectory round-off."""
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            rtol, atol = TRAJECTORY_FLOAT32
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def assert_params_close(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Equal to the round-off of ``dtype`` (``tests/tolerances.py``)."""
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p.double(), q.double(), **tolerance(dtype))


# --- the command line -----------------------------------------------------------------------

#: Options that make a ``singd`` run fast and quiet on the CPU.
FAST = ["--batch-size", "256", "--threads", "1", "--no-progress", "--device", "cpu"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``singd argv`` in-process; return (exit status, stdout, stderr)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def write_fake_cifar10(root: Path, per_file: int = 8) -> Path:
    """A CIFAR-10 folder of random images in the python-pickle format (no download)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_file).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder
