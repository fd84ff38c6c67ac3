"""Time of a training step and optimizer-state memory, as ratios to SGD (issue 3).

Run (needs ``pip install -e ".[cli]"``)::

    python benchmarks/step_time.py                       # full run, prints Markdown
    python benchmarks/step_time.py --out benchmarks/step_time.md
    python benchmarks/step_time.py --quick --scenarios mlp --structures diagonal

Scenarios: (a) ``cnn`` — a VGG-style CNN (:func:`singd.cli.models.vgg_cnn`) on
3×32×32 inputs with 100 classes, batch 32; (b) ``mlp`` — an MLP 784-512-512-10 at
batch 128; (c) ``tokens`` — a token-wise MLP 128-256-256-10 on ``[16, 64, 128]``
sequences (per-token loss, ``loss_average="batch+sequence"``). Inputs are random;
cost does not depend on their values.

Optimizers: SGD with momentum, AdamW, KFAC, IKFAC, and SINGD with every structure
that can be named now (:func:`singd.cli.optimizers.every_structure`; SINGD-dense
is INGD), each at ``T = 1`` and ``T = 10``.

Method. One CPU thread (``torch.set_num_threads(1)``), or one GPU with
``--device cuda`` (float32; cuDNN's default TF32 convolutions, as a user gets them).
A *round* is 10 consecutive training steps (so it holds exactly one factor refresh
at T = 10, and ten at T = 1); after one warm-up round per optimizer, the optimizers
of a scenario are timed round-robin, so machine noise hits all of them alike, and each reports the
median round divided by 10. Ratios are against SGD measured in the same
round-robin. Optimizer state = every tensor in ``optimizer.state_dict()``
(:func:`singd.cli.measure.optimizer_state_bytes`), after the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer
from tqdm import tqdm

from singd.cli.data import random_batch
from singd.cli.measure import CLOCKS, interleaved_times, median, optimizer_state_bytes
from singd.cli.models import mlp, tokenwise_mlp, vgg_cnn
from singd.cli.optimizers import OptimizerSpec, build_optimizer, every_structure, usable_structures
from singd.cli.report import Column, markdown_table
from singd.cli.runs import Precision, resolve_device, train_step

#: Steps per timed round (a multiple of every T measured).
ROUND_STEPS = 10

#: Refresh intervals measured.
T_VALUES = (1, 10)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A model and random batch to time.

    Attributes:
        title: Description in the report.
        model: Builds the model.
        input_shape: Shape of one input (without the batch dimension).
        num_classes: Number of classes (labels are per token for sequences).
        batch_size: Batch size.
        loss_average: ``"batch"`` or ``"batch+sequence"`` (Kronecker optimizers).
    """

    title: str
    model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    loss_average: str


SCENARIOS: dict[str, Scenario] = {
    "cnn": Scenario(
        "VGG-style CNN on 3×32×32 inputs, 100 classes, batch 32",
        lambda: vgg_cnn(100),
        (3, 32, 32),
        100,
        32,
        "batch",
    ),
    "mlp": Scenario(
        "MLP 784-512-512-10, batch 128", lambda: mlp((784, 512, 512, 10)), (784,), 10, 128, "batch"
    ),
    "tokens": Scenario(
        "token-wise MLP 128-256-256-10 on [16, 64, 128] sequences",
        lambda: tokenwise_mlp(128, 256, 10),
        (64, 128),
        10,
        16,
        "batch+sequence",
    ),
}

#: Optimizer families (``--optimizers``); ``singd`` expands to one entry per structure.
FAMILIES = ("sgd", "adamw", "kfac", "ikfac", "singd")


def optimizer_specs(families: Sequence[str], structures: Sequence[str]) -> list[OptimizerSpec]:
    """SGD first (the reference), then the other chosen families."""
    specs = [OptimizerSpec("sgd")]
    for family in families:
        if family == "singd":
            specs += [OptimizerSpec("singd", s) for s in structures]
        elif family != "sgd":
            specs.append(OptimizerSpec(family))
    return specs


def _hyperparameters(spec: OptimizerSpec, T: int) -> dict[str, float]:
    # Small steps keep random-label training finite; the cost does not depend on them.
    if spec.name in ("sgd", "adamw"):
        return {"lr": 1e-3}
    return {"lr": 1e-3, "lr_cov": 1e-2, "T": T}


def _round(
    scenario: Scenario, spec: OptimizerSpec, T: int, device: torch.device
) -> tuple[Callable[[], None], Optimizer]:
    """A fresh model and optimizer; returns (run one round of steps, the optimizer)."""
    torch.manual_seed(0)
    model = scenario.model().to(device)
    optimizer = build_optimizer(
        dataclasses.replace(spec, hyperparameters=_hyperparameters(spec, T)),
        model,
        loss_average=scenario.loss_average,
    )
    X, y = random_batch(
        scenario.batch_size, scenario.input_shape, scenario.num_classes, device=device
    )
    precision = Precision("float32")

    def one_round() -> None:
        for _ in range(ROUND_STEPS):
            train_step(model, optimizer, X, y, precision)

    return one_round, optimizer


def measure_scenario(
    scenario: Scenario,
    specs: Sequence[OptimizerSpec],
    t_values: Sequence[int],
    repeats: int,
    warmup: int,
    bar: tqdm,
    device: torch.device,
    clock: str = "wall",
) -> list[dict[str, object]]:
    """Rows ``{optimizer, ms/step and ×SGD per T, state bytes and ×SGD}`` for one scenario."""
    rows = {spec.label: {"optimizer": spec.label} for spec in specs}
    for T in t_values:
        built = {spec.label: _round(scenario, spec, T, device) for spec in specs}
        rounds = {label: work for label, (work, _) in built.items()}
        times = interleaved_times(
            rounds, repeats, warmup=warmup, device=device, progress=bar.update, clock=CLOCKS[clock]
        )
        ms = {label: 1000.0 * median(t) / ROUND_STEPS for label, t in times.items()}
        state = {label: optimizer_state_bytes(optim) for label, (_, optim) in built.items()}
        for label, row in rows.items():
            row[f"ms_T{T}"] = ms[label]
            row[f"ratio_T{T}"] = ms[label] / ms["SGD"]
            row["state_kib"] = state[label] / 1024
            row["state_ratio"] = state[label] / state["SGD"]
    return list(rows.values())


def columns(t_values: Sequence[int]) -> list[Column]:
    """The report's columns."""
    cols = [Column("optimizer", "optimizer")]
    for T in t_values:
        cols += [
            Column(f"ms_T{T}", f"ms/step T={T}", ".2f"),
            Column(f"ratio_T{T}", f"×SGD T={T}", ".2f"),
        ]
    return [
        *cols,
        Column("state_kib", "state [KiB]", ".0f"),
        Column("state_ratio", "state ×SGD", ".2f"),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Time a training step of SGD, AdamW, KFAC, IKFAC and SINGD (every "
        "structure) on three models, as ratios to SGD; print a Markdown report."
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 timed rounds instead of 7 (a rough look)"
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per optimizer (default: 7)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=list(SCENARIOS),
        default=list(SCENARIOS),
        help="models to time (default: all)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=FAMILIES,
        default=list(FAMILIES),
        help="optimizer families (default: all; SGD always runs as the reference)",
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        help="SINGD structures (default: every structure that can be named now)",
    )
    parser.add_argument(
        "--T",
        nargs="+",
        type=int,
        default=list(T_VALUES),
        dest="t_values",
        help=f"refresh intervals, each dividing {ROUND_STEPS} (default: 1 10)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default: one thread) or cuda[:i] (one GPU, synchronised around each round)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (default): elapsed time; cpu: the thread's CPU time, which leaves out "
        "waits for a core on a shared machine (CPU only)",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except (RuntimeError, ValueError) as error:
        parser.error(f"--device: {error}")
    if args.clock == "cpu" and args.device.type != "cpu":
        parser.error("--clock cpu times the host thread only; use it with --device cpu")
    bad = [T for T in args.t_values if T < 1 or ROUND_STEPS % T]
    if bad:
        parser.error(f"--T values must divide {ROUND_STEPS}, got {bad}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    if args.structures is not None:
        unknown = [s for s in args.structures if not usable_structures([s])]
        if unknown:
            parser.error(f"unknown structures {unknown}")
    return args


def _shown_arguments(argv: Sequence[str] | None) -> list[str]:
    """The command-line arguments without ``--out PATH`` (where the report goes)."""
    args = list(argv if argv is not None else sys.argv[1:])
    if "--out" in args:
        i = args.index("--out")
        del args[i : i + 2]
    return args


def _device_description(device: torch.device) -> str:
    """What ran the steps, for the report's header."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)} (float32, cuDNN TF32 convolutions)"
    return f"1 CPU thread, {platform.machine()} {platform.processor() or ''}".rstrip()


#: How the report names each clock of ``--clock``.
CLOCK_NAMES = {"wall": "elapsed time", "cpu": "the thread's CPU time"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print (and optionally write) the Markdown report."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    device = args.device
    structures = args.structures if args.structures is not None else every_structure()
    specs = optimizer_specs(args.optimizers, structures)
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = 1
    lines = [
        "# Step time and optimizer state, relative to SGD",
        "",
        f"torch {torch.__version__}, {_device_description(device)}, "
        f"{CLOCK_NAMES[args.clock]}; "
        f"median of {repeats} "
        f"rounds of {ROUND_STEPS} steps after {warmup} warm-up round; "
        "state = tensors in `optimizer.state_dict()`. Produced by `"
        + " ".join(["python benchmarks/step_time.py", *_shown_arguments(argv)])
        + "`; a machine shared with other jobs makes single numbers noisy, the ratios "
        "within one table less so.",
    ]
    total = len(args.scenarios) * len(args.t_values) * len(specs) * repeats
    with tqdm(total=total, unit="round", disable=args.no_progress, file=sys.stderr) as bar:
        for name in args.scenarios:
            scenario = SCENARIOS[name]
            bar.set_description(name)
            rows = measure_scenario(
                scenario, specs, args.t_values, repeats, warmup, bar, device, args.clock
            )
            lines += [
                "",
                f"## {name}: {scenario.title}",
                "",
                markdown_table(rows, columns(args.t_values)),
            ]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
