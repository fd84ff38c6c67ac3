"""CPUs: ``step()`` with the parameter step written in place, against out of place.

Run::

    python benchmarks/in_place_step.py                      # prints Markdown
    python benchmarks/in_place_step.py --scenarios mlp --optimizers singd:diagonal

Eagerly on a CPU a parameter step proven finite is written in place at the commit
(:mod:`singd.optim.in_place`); elsewhere it is computed out of place, checked, and
copied in by the commit. Each optimizer of ``step_time.py``'s models trains once, in
one process; rounds of 10 training steps alternate (ABBA) between the shipped step and
the out-of-place one (``StepGuard.writes_in_place`` returning False), with the same
model and data, so the machine's load moves both alike. Reported: the median ``step()``
time of each and their ratio (< 1: in place is faster). One CPU thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root, for benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_time import SCENARIOS, _hyperparameters
from singd.cli.data import random_batch
from singd.cli.optimizers import OptimizerSpec, build_optimizer
from singd.cli.report import Column, markdown_table
from singd.optim.guard import StepGuard

ROUND_STEPS = 10
SPECS = ("singd:diagonal", "singd:block30diagonal", "ingd", "kfac")


def _spec(text: str) -> OptimizerSpec:
    name, _, structure = text.partition(":")
    return OptimizerSpec(name, structure) if structure else OptimizerSpec(name)


def measure(scenario: str, spec: OptimizerSpec, T: int, rounds: int) -> dict[str, float]:
    """Median ms per ``step()``, in place and out of place."""
    sc = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = sc.model()
    hyperparameters = _hyperparameters(spec, T)
    optimizer = build_optimizer(
        dataclasses.replace(spec, hyperparameters=hyperparameters),
        model,
        loss_average=sc.loss_average,
    )
    X, y = random_batch(sc.batch_size, sc.input_shape, sc.num_classes, device=torch.device("cpu"))
    loss_function = torch.nn.CrossEntropyLoss()
    shipped = StepGuard.writes_in_place

    def one_round(in_place: bool) -> float:
        StepGuard.writes_in_place = shipped if in_place else (lambda self, tensors: False)  # type: ignore[method-assign]
        try:
            times = []
            for _ in range(ROUND_STEPS):
                optimizer.zero_grad(set_to_none=True)
                out = model(X)
                loss_function(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e3
        finally:
            StepGuard.writes_in_place = shipped  # type: ignore[method-assign]

    one_round(True), one_round(False)  # warm-up
    results: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for in_place in (True, False) if r % 2 else (False, True):
            results[in_place].append(one_round(in_place))
    ratios = [a / b for a, b in zip(results[True], results[False], strict=True)]
    return {
        "in_place": statistics.median(results[True]),
        "out_of_place": statistics.median(results[False]),
        "ratio": statistics.median(ratios),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--optimizers", nargs="+", default=list(SPECS), help="name[:structure]")
    parser.add_argument("--T", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [
        {"model": scenario, "optimizer": spec.label, **measure(scenario, spec, args.T, args.rounds)}
        for scenario in args.scenarios
        for spec in map(_spec, args.optimizers)
    ]
    text = "\n".join(
        [
            "# step() on a CPU: the parameter step in place against out of place",
            "",
            f"torch {torch.__version__}, 1 CPU thread, T = {args.T}; medians of {args.rounds} "
            f"alternating (ABBA) rounds of {ROUND_STEPS} steps; ratio: median of the paired "
            "per-round ratios. Produced by `python benchmarks/in_place_step.py"
            + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a)
            + "`.",
            "",
            markdown_table(
                rows,
                [
                    Column("model", "model"),
                    Column("optimizer", "optimizer"),
                    Column("in_place", "in place ms", ".2f"),
                    Column("out_of_place", "out of place ms", ".2f"),
                    Column("ratio", "in place ÷ out of place", ".2f"),
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
