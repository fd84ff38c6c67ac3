"""Step time at the sizes users train, for a GPU (issue 12's "sizes users train" table).

Run on a machine with one CUDA GPU::

    python benchmarks/large_models.py --device cuda --out benchmarks/large_models_cuda.md
    python benchmarks/large_models.py --device cuda --compile     # adds compiled SINGD rows

Scenarios: ``resnet18`` — torchvision's ResNet-18 in plain ``torch.nn``
(:func:`singd.cli.models.resnet`, BatchNorm trained by the fallback rule) on 3×224×224
inputs, 1000 classes, batch 64, float32 (TF32 convolutions on GPUs); ``gpt2`` — a
GPT-2-124M-shaped decoder (:class:`GPT2Shaped`: 12 blocks of width 768, 12 heads, MLP
3072, vocabulary 50257, 1024 positions, the output projection tied to the token
embedding) on sequences of 512 tokens, batch 8, under bfloat16 autocast with float32
master weights (the poster's setting for SINGD; its 1.29× for SINGD-Diag is the figure
to beat). Per optimizer and refresh interval T: median ms per step over rounds of T
steps (so a refresh every T steps is amortised), ×SGD measured side by side in the same
process, and the peak CUDA memory of a round. ``--quick`` shrinks both models to a
CPU-sized smoke test (the test suite runs it); the figures are meaningful on a GPU only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from singd.cli.measure import interleaved_times, median, peak_cuda_memory
from singd.cli.models import resnet
from singd.cli.optimizers import OptimizerSpec, build_optimizer
from singd.cli.report import Column, markdown_table


class GPT2Block(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP, each with a residual (GPT-2's)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=2)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(B, S, D))
        return x + self.out(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class GPT2Shaped(nn.Module):
    """A GPT-2-shaped language model (defaults: the 124M model); logits ``[B, S, vocab]``."""

    def __init__(
        self,
        vocab: int = 50257,
        positions: int = 1024,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(positions, width)
        self.blocks = nn.Sequential(*(GPT2Block(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied, as GPT-2's

    def forward(self, ids: Tensor) -> Tensor:
        where = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.blocks(self.tokens(ids) + self.positions(where))))


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A model, its random batch and its precision."""

    title: str
    model: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[Tensor, Tensor]]
    autocast: torch.dtype | None
    loss_average: str


def _images(batch: int, side: int, classes: int) -> Callable[[torch.device], Any]:
    def make(device: torch.device) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(batch, 3, side, side, generator=gen)
        return X.to(device), torch.randint(classes, (batch,), generator=gen).to(device)

    return make


def _tokens(batch: int, length: int, vocab: int) -> Callable[[torch.device], Any]:
    def make(device: torch.device) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(vocab, (batch, length + 1), generator=gen).to(device)
        return ids[:, :-1], ids[:, 1:]  # next-token targets

    return make


def scenarios(quick: bool) -> dict[str, Scenario]:
    """The two scenarios (module docstring); ``quick``: CPU-sized stand-ins."""
    if quick:
        return {
            "resnet18": Scenario(
                "ResNet-18 shape, widths ÷8, 32×32 inputs, batch 4 (quick)",
                lambda: resnet((8, 16, 32, 64), num_classes=10),
                _images(4, 32, 10),
                None,
                "batch",
            ),
            "gpt2": Scenario(
                "GPT-2 shape, 2 blocks of width 32, vocabulary 97, sequences of 16, batch 2 "
                "(quick)",
                lambda: GPT2Shaped(97, 32, 32, 2, 2),
                _tokens(2, 16, 97),
                torch.bfloat16,
                "batch+sequence",
            ),
        }
    return {
        "resnet18": Scenario(
            "ResNet-18 on 3×224×224 inputs, 1000 classes, batch 64, float32",
            resnet,
            _images(64, 224, 1000),
            None,
            "batch",
        ),
        "gpt2": Scenario(
            "GPT-2-124M shape (12 blocks, width 768, vocabulary 50257), sequences of 512, "
            "batch 8, bfloat16 autocast",
            GPT2Shaped,
            _tokens(8, 512, 50257),
            torch.bfloat16,
            "batch+sequence",
        ),
    }


def _round(
    scenario: Scenario, spec: OptimizerSpec, T: int, device: torch.device, compiled: bool
) -> Callable[[], None]:
    """A fresh model and optimizer; returns one round of T training steps."""
    torch.manual_seed(0)
    model = scenario.model().to(device)
    hyper: dict[str, float] = {"lr": 1e-4}
    if spec.name not in ("sgd", "adamw"):
        hyper |= {"lr_cov": 1e-2, "T": T}
    optimizer = build_optimizer(
        dataclasses.replace(spec, hyperparameters=hyper), model, loss_average=scenario.loss_average
    )
    if compiled:
        optimizer.compile()  # type: ignore[operator]
    X, y = scenario.batch(device)

    def one_round() -> None:
        for _ in range(T):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(
                device.type, scenario.autocast, enabled=scenario.autocast is not None
            ):
                logits = model(X)
            F.cross_entropy(logits.flatten(0, -2).float(), y.flatten()).backward()
            optimizer.step()

    return one_round


def measure(
    scenario: Scenario,
    specs: Sequence[tuple[OptimizerSpec, bool]],
    T: int,
    repeats: int,
    device: torch.device,
    progress: Callable[[], None],
) -> list[dict[str, Any]]:
    """One row per (optimizer, compiled): ms per step, ×SGD, peak memory (CUDA)."""
    rounds = {
        _label(spec, compiled): _round(scenario, spec, T, device, compiled)
        for spec, compiled in specs
    }
    times = interleaved_times(rounds, repeats, warmup=1, device=device, progress=progress)
    ms = {label: 1000.0 * median(t) / T for label, t in times.items()}
    rows = []
    for label, work in rounds.items():
        row: dict[str, Any] = {"optimizer": label, "T": T, "ms": ms[label]}
        row["ratio"] = ms[label] / ms["SGD"]
        if device.type == "cuda":
            row["memory"] = peak_cuda_memory(work, device) / 2**30
        rows.append(row)
    return rows


def _label(spec: OptimizerSpec, compiled: bool) -> str:
    return f"{spec.label} (compiled)" if compiled else spec.label


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--scenarios", nargs="+", choices=("resnet18", "gpt2"), default=None)
    parser.add_argument(
        "--optimizers", nargs="+", default=["sgd", "adamw", "kfac", "ikfac", "ingd", "singd"]
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        default=["diagonal", "block_diagonal(30)", "hierarchical(15, 15)"],
    )
    parser.add_argument("--T", nargs="+", type=int, default=[1, 10], dest="t_values")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add compiled SINGD rows")
    parser.add_argument("--quick", action="store_true", help="CPU-sized models (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    chosen = scenarios(args.quick)
    names = args.scenarios or list(chosen)
    specs: list[tuple[OptimizerSpec, bool]] = [(OptimizerSpec("sgd"), False)]
    for family in args.optimizers:
        if family == "singd":
            for structure in args.structures:
                spec = OptimizerSpec("singd", structure)
                specs.append((spec, False))
                if args.compile:
                    specs.append((spec, True))
        elif family != "sgd":
            specs.append((OptimizerSpec(family), False))
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    lines = [
        "# Step time at the sizes users train",
        "",
        f"torch {torch.__version__}, {device_name}; median ms per step over {args.repeats} "
        "rounds of T steps, ×SGD in the same process, peak CUDA memory of a round. Produced "
        "by `python benchmarks/large_models.py "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-progress")
        + "`.",
    ]
    columns = [
        Column("optimizer", "optimizer"),
        Column("T", "T"),
        Column("ms", "ms/step", ".1f"),
        Column("ratio", "×SGD", ".2f"),
    ]
    if args.device.type == "cuda":
        columns.append(Column("memory", "peak GiB", ".2f"))
    total = len(names) * len(args.t_values) * len(specs) * (args.repeats + 1)
    with tqdm(total=total, disable=args.no_progress, file=sys.stderr) as bar:
        for name in names:
            rows: list[dict[str, Any]] = []
            for T in args.t_values:
                rows += measure(chosen[name], specs, T, args.repeats, args.device, bar.update)
            lines += ["", f"## {name}: {chosen[name].title}", "", markdown_table(rows, columns)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
