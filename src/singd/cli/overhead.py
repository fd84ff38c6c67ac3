"""``singd overhead``: the poster's "computational efficiency" table, measured here.

The poster (Lin et al., ICML 2024) reports, for VGG on CIFAR-100, peak memory and
iteration time relative to SGD. This command measures the same quantities for a
VGG-style CNN (:func:`singd.cli.models.vgg_cnn`) on random CIFAR-100-shaped
batches (3×32×32 inputs, 100 classes; the values do not matter for cost) and
prints them beside the poster's.

* time: median over rounds of ``T`` consecutive training steps (so the factor
  refresh every ``T`` steps is amortised as in training), the optimizers timed
  round-robin;
* memory: on a GPU, the peak allocated CUDA memory of a round (parameters,
  gradients, activations and optimizer state, as the poster); on a CPU, which has
  no allocator statistics, the estimate parameters + gradients + activations saved
  for backward + optimizer state (:mod:`singd.cli.measure`);
* precision: the poster trains everything in bfloat16 mixed precision except KFAC
  (float32). ``--precision auto`` does so on a GPU (``bf16-autocast``); on a CPU it
  uses float32 for all, where bfloat16 kernels are not representative.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from singd.cli.data import random_batch
from singd.cli.measure import (
    interleaved_times,
    median,
    optimizer_state_bytes,
    parameter_bytes,
    peak_cuda_memory,
    saved_activation_bytes,
)
from singd.cli.models import vgg_cnn
from singd.cli.optimizers import OptimizerSpec, build_optimizer
from singd.cli.options import (
    CLIError,
    add_run_options,
    apply_threads,
    nonnegative_int,
    positive_float,
    positive_int,
)
from singd.cli.report import Column, render
from singd.cli.runs import PRECISIONS, Precision, train_step

#: The poster's table: method → (memory ×SGD, time ×SGD).
POSTER: dict[str, tuple[float, float]] = {
    "SGD": (1.00, 1.00),
    "AdamW": (1.02, 1.07),
    "SINGD-Diag": (1.02, 1.29),
    "IKFAC": (1.21, 1.84),
    "INGD": (1.29, 1.84),
    "KFAC (fp32)": (1.52, 4.49),
}

#: The optimizer behind each poster row (KFAC always runs in float32, as on the poster).
METHODS: dict[str, OptimizerSpec] = {
    "SGD": OptimizerSpec("sgd"),
    "AdamW": OptimizerSpec("adamw"),
    "SINGD-Diag": OptimizerSpec("singd", "diagonal"),
    "IKFAC": OptimizerSpec("ikfac"),
    "INGD": OptimizerSpec("ingd"),
    "KFAC (fp32)": OptimizerSpec("kfac"),
}

COLUMNS = (
    Column("method", "method"),
    Column("precision", "precision"),
    Column("memory_ratio", "memory ×SGD", ".2f"),
    Column("poster_memory_ratio", "poster memory ×SGD", ".2f"),
    Column("time_ratio", "time ×SGD", ".2f"),
    Column("poster_time_ratio", "poster time ×SGD", ".2f"),
    Column("ms_per_step", "ms/step", ".1f"),
    Column("memory_mib", "memory [MiB]", ".1f"),
)

DESCRIPTION = """\
Measure memory and time relative to SGD for the poster's methods (SGD, AdamW,
SINGD-Diag, IKFAC, INGD, KFAC) on a VGG-style CNN with random CIFAR-100-shaped
batches (3x32x32 inputs, 100 classes), and print the poster's figures beside
them.

time:      median over rounds of T consecutive steps (one factor refresh per
           round), the methods timed round-robin
memory:    on a GPU, the peak allocated CUDA memory of a round (parameters,
           gradients, activations, optimizer state), as on the poster; on a
           CPU, the estimate parameters + gradients + activations saved for
           backward + optimizer state
precision: as on the poster, bf16 autocast for all but KFAC (float32) on a
           GPU; float32 for all on a CPU (see --precision)"""

#: Timed rounds and warm-up rounds of a full and of a ``--quick`` run.
ROUNDS, QUICK_ROUNDS = 7, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``overhead`` on the ``singd`` parser's subparsers."""
    parser = subparsers.add_parser(
        "overhead",
        help="memory and time relative to SGD on a VGG-style CNN, beside the poster's table",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="poster (memory ×SGD / time ×SGD): "
        + ", ".join(f"{k} {m:.2f}/{t:.2f}" for k, (m, t) in POSTER.items()),
    )
    group = parser.add_argument_group("what to measure")
    group.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ROUNDS} timed rounds instead of {ROUNDS}, on a half-width network",
    )
    group.add_argument(
        "--rounds", type=positive_int, help=f"timed rounds per method (default: {ROUNDS})"
    )
    group.add_argument(
        "--warmup", type=nonnegative_int, default=1, help="untimed rounds first (default: 1)"
    )
    group.add_argument(
        "--T",
        type=positive_int,
        default=10,
        dest="T",
        help="refresh interval of the Kronecker methods and steps per round (default: 10)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=32, help="batch size (default: 32)"
    )
    group.add_argument(
        "--width",
        type=positive_float,
        help="multiplies the CNN's channel widths (default: 1; --quick: 0.5)",
    )
    group.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="precision of all methods but KFAC (always float32): 'auto' = bf16-autocast on "
        "a GPU, float32 on a CPU (default: auto)",
    )
    add_run_options(
        parser,
        default_threads=1,
        threads_note="; steadier CPU timings on a busy machine, like benchmarks/step_time.py",
    )
    parser.set_defaults(run=run)
    return parser


@dataclasses.dataclass
class _Candidate:
    """One method's model, optimizer and batch, ready to step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    round: Callable[[], None]
    activation_bytes: int

    def estimated_peak_bytes(self) -> int:
        """Parameters + gradients + saved activations + optimizer state (CPU estimate)."""
        params = parameter_bytes(self.model)
        return 2 * params + self.activation_bytes + optimizer_state_bytes(self.optimizer)


def _candidate(
    spec: OptimizerSpec,
    precision: Precision,
    args: argparse.Namespace,
    width: float,
    device: torch.device,
) -> _Candidate:
    torch.manual_seed(0)
    model = vgg_cnn(100, width=width).to(device=device, dtype=precision.param_dtype)
    X, y = random_batch(args.batch_size, (3, 32, 32), 100, device=device)
    X = X.to(precision.param_dtype)

    def forward() -> None:
        with precision.autocast(device):
            model(X)

    activations = saved_activation_bytes(forward, list(model.parameters()))
    optimizer = build_optimizer(
        dataclasses.replace(spec, hyperparameters=_cost_hyperparameters(spec, args.T)),
        model,
        preconditioner_dtype=precision.preconditioner_dtype,
    )

    def one_round() -> None:
        for _ in range(args.T):
            train_step(model, optimizer, X, y, precision)

    return _Candidate(model, optimizer, precision, one_round, activations)


def _cost_hyperparameters(spec: OptimizerSpec, T: int) -> dict[str, float]:
    """Small steps: the labels are random, and only finite weights have representative cost.

    (IKFAC with the digits default β₁ = 0.1 loses K's invertibility on this network after
    a few refreshes, since β₁‖m_K‖ exceeds 1.)
    """
    if spec.name in ("sgd", "adamw"):
        return {"lr": 1e-3}
    return {"lr": 1e-3, "lr_cov": 1e-2, "T": T}


def run(args: argparse.Namespace) -> int:
    """Run ``singd overhead``; returns the exit status.

    Raises:
        CLIError: If a precision is asked for that the device cannot run.
    """
    apply_threads(args)
    device = args.device
    on_gpu = device.type == "cuda"
    name = args.precision
    if name == "auto":
        name = "bf16-autocast" if on_gpu else "float32"
    precision = Precision(name)
    width = args.width or (0.5 if args.quick else 1.0)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    candidates: dict[str, _Candidate] = {}
    for method, spec in METHODS.items():
        p = Precision("float32") if spec.name == "kfac" else precision
        candidates[method] = _candidate(spec, p, args, width, device)
    print(
        f"singd overhead: VGG-style CNN (width ×{width:g}) on random 3×32×32 inputs, batch "
        f"{args.batch_size}, T={args.T}, {precision.name} (KFAC float32), {device}",
        file=sys.stderr,
    )
    total = len(candidates) * (rounds + args.warmup + (1 if on_gpu else 0))
    with tqdm(total=total, unit="round", disable=args.no_progress, file=sys.stderr) as bar:
        memory: dict[str, int] = {}
        if on_gpu:
            # Peak memory one method at a time: warm up (lazy state), then one measured round.
            for method, c in candidates.items():
                bar.set_description(f"memory of {method}")
                c.round()
                memory[method] = peak_cuda_memory(c.round, device)
                bar.update()
        bar.set_description("timing (round-robin)")
        for _ in range(args.warmup):
            for c in candidates.values():
                c.round()
                bar.update()
        times = interleaved_times(
            {m: c.round for m, c in candidates.items()},
            rounds,
            warmup=0,
            device=device,
            progress=bar.update,
        )
    if not on_gpu:
        memory = {m: c.estimated_peak_bytes() for m, c in candidates.items()}
    ms = {m: 1000.0 * median(t) / args.T for m, t in times.items()}
    broken = [
        m
        for m, c in candidates.items()
        if not all(bool(torch.isfinite(p).all()) for p in c.model.parameters())
    ]
    if broken:
        raise CLIError(
            f"The weights of {', '.join(broken)} became non-finite during the measurement, "
            "so the timings are not representative."
        )
    rows = [
        {
            "method": method,
            "precision": c.precision.name,
            "memory_ratio": memory[method] / memory["SGD"],
            "poster_memory_ratio": POSTER[method][0],
            "time_ratio": ms[method] / ms["SGD"],
            "poster_time_ratio": POSTER[method][1],
            "ms_per_step": ms[method],
            "memory_mib": memory[method] / 2**20,
        }
        for method, c in candidates.items()
    ]
    memory_kind = (
        "peak CUDA memory"
        if on_gpu
        else "parameters + gradients + saved activations + optimizer state"
    )
    print(
        render(
            rows,
            COLUMNS,
            args.format,
            json_extra={
                "device": str(device),
                "memory": memory_kind,
                "T": args.T,
                "batch_size": args.batch_size,
                "width": width,
                "rounds": rounds,
            },
        )
    )
    if args.format == "table":
        print(
            f"\nmemory: {memory_kind}; time: median of {rounds} rounds of T={args.T} steps. "
            "The poster measured peak GPU memory of its own VGG on CIFAR-100.",
        )
    return 0
