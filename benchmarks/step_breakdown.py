"""Where a training step's time goes: SINGD's phases per structure, beside SGD.

Run (needs ``pip install -e ".[cli]"``)::

    python benchmarks/step_breakdown.py                       # CNN, T = 1
    python benchmarks/step_breakdown.py --scenario mlp --T 10 --structures diagonal dense

Same models, batches and one CPU thread as ``benchmarks/step_time.py`` (its
scenarios are reused). Each optimizer runs rounds of 10 steps: the step time is the
median of rounds timed round-robin (unprofiled), and the phases are averaged over a
few profiled rounds with ``torch.profiler``, through the ranges the optimizer names
(:data:`singd.optim.base.PROFILER_LABELS`): the curvature *statistics* (backward
hooks at refresh steps), the factor *refresh*, the *preconditioning*; the rest of
``step()`` (parameter update, bookkeeping) is torch.optim's ``Optimizer.step#…``
range minus those two. Profiling slows every operation down a little, so the phases
add up to more than the step time's excess over SGD (up to 1.4× on the CNN): read
them as shares, the unprofiled ms/step as the cost.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from step_time import ROUND_STEPS, SCENARIOS, _round
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from singd.cli.measure import interleaved_times, median
from singd.cli.optimizers import OptimizerSpec
from singd.cli.report import Column, markdown_table
from singd.optim.base import PROFILER_LABELS

#: The step breakdown times CPU steps (one thread), like the CPU table of step_time.py.
CPU = torch.device("cpu")

#: The structures of the issue's targets, and the dense one.
DEFAULT_STRUCTURES = ("diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz", "dense")


def phase_times(optimizer: torch.optim.Optimizer, work, rounds: int) -> dict[str, float]:
    """Milliseconds per step of each named phase, over ``rounds`` profiled rounds."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            work()
    totals = {e.key: e.cpu_time_total / 1000.0 for e in prof.key_averages()}
    phases = {name: totals.get(label, 0.0) for name, label in PROFILER_LABELS.items()}
    step = totals.get(f"Optimizer.step#{type(optimizer).__name__}.step", 0.0)
    phases["rest of step()"] = step - phases["refresh"] - phases["precondition"]
    return {name: ms / (rounds * ROUND_STEPS) for name, ms in phases.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="cnn")
    parser.add_argument("--structures", nargs="+", default=list(DEFAULT_STRUCTURES))
    parser.add_argument("--T", type=int, default=1, help="refresh interval (divides 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per optimizer")
    parser.add_argument(
        "--profiled-rounds", type=int, default=3, help="profiled rounds per optimizer"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.T < 1 or ROUND_STEPS % args.T:
        parser.error(f"--T must divide {ROUND_STEPS}, got {args.T}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    scenario = SCENARIOS[args.scenario]
    specs = [OptimizerSpec("sgd"), *(OptimizerSpec("singd", s) for s in args.structures)]
    built = {spec.label: _round(scenario, spec, args.T, CPU) for spec in specs}
    rounds = {label: work for label, (work, _) in built.items()}
    with tqdm(
        total=len(specs) * args.repeats, unit="round", disable=args.no_progress, file=sys.stderr
    ) as bar:
        times = interleaved_times(rounds, args.repeats, warmup=1, progress=bar.update)
    ms = {label: 1000.0 * median(t) / ROUND_STEPS for label, t in times.items()}
    rows = []
    for label, (work, optimizer) in built.items():
        ratio = ms[label] / ms["SGD"]
        row: dict[str, object] = {"optimizer": label, "ms": ms[label], "ratio": ratio}
        if label != "SGD":
            row.update(phase_times(optimizer, work, args.profiled_rounds))
        rows.append(row)
    columns = [
        Column("optimizer", "optimizer"),
        Column("ms", "ms/step", ".2f"),
        Column("ratio", "×SGD", ".2f"),
        *(Column(name, f"{name} [ms]", ".2f") for name in PROFILER_LABELS),
        Column("rest of step()", "rest of step() [ms]", ".2f"),
    ]
    print(
        f"# Step breakdown: {scenario.title}, T = {args.T}\n\n"
        f"torch {torch.__version__}, 1 CPU thread; ms/step = median of {args.repeats} "
        f"rounds of {ROUND_STEPS} steps (unprofiled); phases in ms per step, averaged over "
        f"{args.profiled_rounds} profiled rounds. Produced by `python "
        "benchmarks/step_breakdown.py`.\n"
    )
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
