"""Wall-clock of equal layers stacked against one layer at a time, side by side.

Run::

    python benchmarks/stacked_layers.py                     # prints Markdown
    python benchmarks/stacked_layers.py --device cuda --depth 24

On ``op_count``'s 24-layer MLP (``Linear(64, 64)`` + tanh, batch 32), each optimizer
trains twice in one process: as shipped (diagonal layers batched, equal layers stacked:
:mod:`singd.preconditioners.joint`) and with every preconditioner's ``batch_key``
returning None (one layer at a time, the step before the batches). Rounds of 10
training steps (T = 1: every step refreshes) alternate between the two; the report
gives the medians and their ratio (< 1: the batches are faster). One CPU thread.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: the repository root, for benchmarks.op_count
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.op_count import build, deep_mlp
from singd.cli.optimizers import OptimizerSpec
from singd.cli.report import Column, markdown_table
from singd.preconditioners import KFACPreconditioner, SINGDPreconditioner

ROUND_STEPS = 10
SPECS = (
    "ingd",
    "ikfac",
    "kfac",
    "singd:diagonal",
    "singd:block_diagonal(30)",
    "singd:hierarchical(15, 15)",
    "singd:tril_toeplitz",
)


@contextlib.contextmanager
def one_layer_at_a_time(active: bool) -> Iterator[None]:
    """Every preconditioner alone (``batch_key`` None) while ``active``."""
    if not active:
        yield
        return
    saved = SINGDPreconditioner.batch_key, KFACPreconditioner.batch_key
    SINGDPreconditioner.batch_key = KFACPreconditioner.batch_key = lambda self: None  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        SINGDPreconditioner.batch_key, KFACPreconditioner.batch_key = saved  # type: ignore[method-assign]


def _spec(text: str) -> OptimizerSpec:
    name, _, structure = text.partition(":")
    return OptimizerSpec(name, structure) if structure else OptimizerSpec(name)


def measure(spec: OptimizerSpec, depth: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms per training step, batched and one layer at a time."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(32, 64, generator=gen).to(device)
    y = torch.randint(10, (32,), generator=gen).to(device)
    runs = {}
    for alone in (False, True):
        torch.manual_seed(0)
        model = deep_mlp(depth).to(device)
        runs[alone] = (model, build(spec, 1, model))

    def one_round(alone: bool) -> float:
        model, optimizer = runs[alone]
        with one_layer_at_a_time(alone):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(ROUND_STEPS):
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(X), y).backward()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / ROUND_STEPS * 1e3

    for alone in (False, True):  # warm-up
        one_round(alone)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for alone in (False, True):
            times[alone].append(one_round(alone))
    batched, alone_ms = statistics.median(times[False]), statistics.median(times[True])
    return {"batched": batched, "alone": alone_ms, "ratio": batched / alone_ms}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(SPECS), help="name[:structure]")
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for text in args.optimizers:
        spec = _spec(text)
        rows.append(
            {"optimizer": spec.label, **measure(spec, args.depth, args.rounds, args.device)}
        )
    where = (
        torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "1 CPU thread"
    )
    text = "\n".join(
        [
            "# Equal layers stacked against one layer at a time",
            "",
            f"torch {torch.__version__}, {where}; {args.depth} × Linear(64, 64) + tanh, batch 32, "
            f"T = 1; median of {args.rounds} alternating rounds of {ROUND_STEPS} training steps. "
            "Produced by `python benchmarks/stacked_layers.py"
            + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a)
            + "`.",
            "",
            markdown_table(
                rows,
                [
                    Column("optimizer", "optimizer"),
                    Column("batched", "batched ms/step", ".1f"),
                    Column("alone", "one at a time ms/step", ".1f"),
                    Column("ratio", "batched ÷ alone", ".2f"),
                ],
            ),
        ]
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
