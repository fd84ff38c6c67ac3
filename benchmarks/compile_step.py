"""``optimizer.compile()``: ``step()`` eager against compiled, and what recompiles.

Run::

    python benchmarks/compile_step.py                         # Inductor, CPU, one thread
    python benchmarks/compile_step.py --backend aot_eager     # trace only (no codegen)
    python benchmarks/compile_step.py --device cuda --mode reduce-overhead

Model: the 24-layer MLP of ``benchmarks/op_count.py`` (24 × Linear(64, 64) + tanh,
then Linear(64, 10), batch 32), float32. Optimizers: SGD with momentum (eager, the
reference), SINGD-diagonal, INGD (dense factors) and KFAC, at ``T = 2`` (refresh and
plain steps alternate), with a ``StepLR`` scheduler stepped after every step (``lr``
changes at every step) and an ``lr_cov`` schedule (β₁ changes at every refresh).

Printed, in one run, per optimizer:

* **compile**: seconds of the warm-up steps (the first refresh step without momenta,
  the first plain step, a refresh step with momenta), in which the graphs compile,
  and the number of graphs (``counters["stats"]["unique_graphs"]``);
* **recompiles** over the timed steps (should be 0: the changing ``lr`` and β₁ enter
  the graph as device scalars);
* **step()**: the median over rounds (10 steps each, the optimizers round-robin so
  machine noise hits all alike) of the mean time of ``optimizer.step()`` alone,
  eager and compiled, and as a ratio to SGD's eager ``step()``.

On a CPU a compiled step is bound by Inductor's generated C++ kernels and the
guards of the compiled frame, not by kernel launches, so the figures here are not
the GPU ones: they show that the compiled step runs and what it costs per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.op_count import deep_mlp
from singd import KFAC, SINGD

T = 2
ROUND = 10  # steps per timed round

#: name → optimizer factory (SGD first: the reference)
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
    "SINGD-diagonal": lambda m: SINGD(
        m, structures=("diagonal", "diagonal"), lr=1e-3, T=T, lr_cov=lambda t: 1e-2 / (1 + t)
    ),
    "INGD (dense)": lambda m: SINGD(
        m, structures=("dense", "dense"), lr=1e-3, T=T, lr_cov=lambda t: 1e-2 / (1 + t)
    ),
    "KFAC": lambda m: KFAC(m, lr=1e-3, T=T, lr_cov=lambda t: 1e-2 / (1 + t)),
}


class Run:
    """One optimizer on its own copy of the model, eager or compiled."""

    def __init__(
        self, name: str, compiled: bool, device: torch.device, options: dict[str, Any]
    ) -> None:
        torch.manual_seed(0)
        self.model = deep_mlp().to(device)
        self.optim = OPTIMIZERS[name](self.model)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optim, 1, gamma=0.999)
        generator = torch.Generator().manual_seed(1)
        self.X = torch.randn(32, 64, generator=generator).to(device)
        self.y = torch.randint(10, (32,), generator=generator).to(device)
        self.device = device
        self.compile_s = 0.0
        self.graphs = 0
        if compiled:
            graphs_before = counters["stats"]["unique_graphs"]
            self.optim.compile(**options)  # type: ignore[attr-defined]
            start = time.perf_counter()
            self.steps(3)  # warm-up: the graphs of each kind of step compile
            self.compile_s = time.perf_counter() - start
            self.graphs = counters["stats"]["unique_graphs"] - graphs_before
        else:
            self.steps(3)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def steps(self, n: int) -> float:
        """Train ``n`` steps; the seconds spent in ``optimizer.step()``."""
        spent = 0.0
        for _ in range(n):
            self.optim.zero_grad()
            nn.functional.cross_entropy(self.model(self.X), self.y).backward()
            self.sync()
            start = time.perf_counter()
            self.optim.step()
            self.sync()
            spent += time.perf_counter() - start
            self.scheduler.step()
        return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (reduce-overhead, ...)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Dynamo's recompile limit counts graphs per code object: the compiled optimizers
    # here share StepPhasesMixin._device_step, up to three graphs each
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, 4 * len(OPTIMIZERS)
    )
    device = torch.device(args.device)
    options: dict[str, Any] = {"backend": args.backend}
    if args.mode:
        options["mode"] = args.mode
    runs: dict[tuple[str, bool], Run] = {}
    for name in OPTIMIZERS:
        for compiled in (False, True) if name != "SGD" else (False,):
            runs[name, compiled] = Run(name, compiled, device, options)
    graphs_before = counters["stats"]["unique_graphs"]
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            times[key].append(run.steps(ROUND) / ROUND)
    recompiles = counters["stats"]["unique_graphs"] - graphs_before
    median = {key: statistics.median(values) for key, values in times.items()}
    sgd = median["SGD", False]
    print(
        f"step() of the 24-layer MLP (batch 32, float32, T = {T}, lr and β₁ scheduled), "
        f"{device}, {args.threads} thread(s), torch {torch.__version__}, "
        f"backend={args.backend}{f', mode={args.mode}' if args.mode else ''}; "
        f"median of {args.rounds} rounds of {ROUND} steps. Recompiles over the timed "
        f"steps (all optimizers): {recompiles}.\n"
    )
    header = ("optimizer", "eager step()", "compiled step()", "compiled/eager", "compile", "graphs")
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in OPTIMIZERS:
        eager = median[name, False]
        row = f"| {name} | {eager * 1e3:.2f} ms ({eager / sgd:.1f}× SGD) |"
        if (name, True) in runs:
            run = runs[name, True]
            compiled = median[name, True]
            row += (
                f" {compiled * 1e3:.2f} ms ({compiled / sgd:.1f}× SGD) | {compiled / eager:.2f} |"
                f" {run.compile_s:.0f} s | {run.graphs} |"
            )
        else:
            row += " — | — | — | — |"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
