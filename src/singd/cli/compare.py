"""``singd compare``: every optimizer × precision on digits, one table and two plots.

All runs use the same model initialisation, mini-batch order, number of epochs
and batch size, and train round-robin, one step of each in turn, so that machine
noise affects all alike. Ratios are against SGD *in the same precision*; memory
is parameters + optimizer state (:mod:`singd.cli.measure`), ms/step the mean wall
time of a step (refresh steps included).
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from singd.cli.data import DATASETS, DatasetError, load_dataset
from singd.cli.optimizers import CHEAP_STRUCTURES, OPTIMIZERS, compare_specs
from singd.cli.options import (
    CLIError,
    add_run_options,
    apply_threads,
    check_output_folder,
    positive_int,
    seed_int,
    structure_name,
)
from singd.cli.plots import plot_accuracy_vs_time, plot_loss_curves
from singd.cli.report import Column, render, to_json
from singd.cli.runs import PRECISIONS, Precision, Run, RunResult, train_interleaved

#: Epochs of a full and of a ``--quick`` comparison.
EPOCHS, QUICK_EPOCHS = 20, 6

COLUMNS = (
    Column("optimizer", "optimizer"),
    Column("precision", "precision"),
    Column("final_loss", "train loss", ".4f"),
    Column("test_accuracy", "test acc [%]", ".1f"),
    Column("ms_per_step", "ms/step", ".2f"),
    Column("time_ratio", "time ×SGD", ".2f"),
    Column("memory_kib", "memory [KiB]", ".0f"),
    Column("memory_ratio", "memory ×SGD", ".2f"),
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``compare`` on the ``singd`` parser's subparsers."""
    parser = subparsers.add_parser(
        "compare",
        help="compare SGD, AdamW, KFAC, IKFAC, INGD and SINGD-* in float32 and bfloat16",
        description=textwrap.fill(
            "Train the same CNN with every optimizer and precision (same "
            "initialisation, batches and budget), print a table (final training loss, test "
            "accuracy, ms/step and memory as ratios to SGD of the same precision) and write "
            "loss_curves.png, accuracy_vs_time.png and results.json to --out. Memory = "
            "parameters + every tensor in the optimizer's state_dict."
        ),
        epilog="examples:\n  singd compare --quick\n"
        "  singd compare --optimizers sgd singd --structures diagonal dense --epochs 20\n"
        "  singd compare --quick --format json > results.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("what to compare")
    group.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EPOCHS} epochs instead of {EPOCHS} (under 90 s on 2 CPU cores)",
    )
    group.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        default=list(OPTIMIZERS),
        metavar="NAME",
        help=f"optimizers to run, among {', '.join(OPTIMIZERS)} (default: all)",
    )
    group.add_argument(
        "--structures",
        nargs="+",
        type=structure_name,
        metavar="STRUCTURE",
        help="structures of the singd runs (default: those of "
        f"{', '.join(CHEAP_STRUCTURES)} that exist)",
    )
    group.add_argument(
        "--precisions",
        nargs="+",
        choices=PRECISIONS,
        default=["float32", "bfloat16"],
        metavar="PRECISION",
        help=f"precisions, among {', '.join(PRECISIONS)} (default: float32 bfloat16; see "
        "`singd train --help`)",
    )
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="dataset (default: digits; CIFAR needs --data-dir and is slow on a CPU)",
    )
    group.add_argument("--data-dir", type=Path, help="folder with the CIFAR files")
    group.add_argument(
        "--epochs",
        type=positive_int,
        help=f"epochs per run (default: {EPOCHS}, --quick {QUICK_EPOCHS})",
    )
    group.add_argument(
        "--T",
        type=positive_int,
        dest="T",
        help="refresh interval of every Kronecker method (default: each one's tuned value, "
        "see `singd train --help`)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=64, help="mini-batch size (default: 64)"
    )
    group.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the (shared) initialisation and batch order (default: 0)",
    )
    group.add_argument(
        "--out",
        type=Path,
        default=Path("singd-compare"),
        help="folder for the plots and results.json (default: ./singd-compare)",
    )
    add_run_options(
        parser,
        default_device="cpu",
        default_threads=1,
        threads_note="; the models are tiny, and one thread is fastest and keeps timings "
        "steady on a busy machine",
    )
    parser.set_defaults(run=run)
    return parser


def summary_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per run, with time and memory ratios against SGD of the same precision."""
    sgd = {r.precision: r for r in results if r.label == "SGD"}
    rows = []
    for r in results:
        base = sgd.get(r.precision)
        rows.append(
            {
                "optimizer": r.label,
                "precision": r.precision,
                "final_loss": r.final_loss,
                "test_accuracy": 100.0 * r.test_accuracy,
                "ms_per_step": r.ms_per_step,
                "time_ratio": r.ms_per_step / base.ms_per_step if base else None,
                "memory_kib": r.memory_bytes / 1024,
                "memory_ratio": r.memory_bytes / base.memory_bytes if base else None,
                "state_bytes": r.state_bytes,
                "param_bytes": r.param_bytes,
                "steps": r.steps,
                "diverged": r.diverged,
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    """Run ``singd compare``; returns the exit status.

    Raises:
        CLIError: For missing data, an empty selection or an unusable ``--out``.
    """
    apply_threads(args)
    device = args.device
    try:
        data = load_dataset(args.dataset, args.data_dir)
    except DatasetError as error:
        raise CLIError(str(error)) from error
    specs = [s for s in compare_specs(args.structures, args.T) if s.name in args.optimizers]
    if not specs:
        raise CLIError("Nothing to run: --optimizers/--structures select no optimizer.")
    check_output_folder(args.out, "--out")  # fail before training, not after
    precisions = [Precision(p) for p in dict.fromkeys(args.precisions)]
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    steps_per_run = epochs * math.ceil(len(data.X_train) / args.batch_size)
    print(
        f"singd compare: {len(specs)} optimizers × {len(precisions)} precisions on "
        f"{data.name}, {epochs} epochs each ({device})",
        file=sys.stderr,
    )
    start = time.perf_counter()
    total = len(specs) * len(precisions) * steps_per_run
    with tqdm(total=total, unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        bar.set_description("building")
        runs = [
            Run(
                spec,
                data,
                precision,
                batch_size=args.batch_size,
                seed=args.seed,
                device=device,
            )
            for precision in precisions
            for spec in specs
        ]
        bar.set_description("training (round-robin)")
        results = train_interleaved(runs, epochs, on_step=bar.update)
        bar.update(total - bar.n)  # diverged runs stop early
    rows = summary_rows(results)
    loss_png = plot_loss_curves(results, args.out / "loss_curves.png")
    accuracy_png = plot_accuracy_vs_time(results, args.out / "accuracy_vs_time.png")
    settings = {
        "dataset": data.name,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "device": str(device),
        "hyperparameters": {s.label: s.resolved() for s in specs},
    }
    curves = [
        {
            "optimizer": r.label,
            "precision": r.precision,
            "losses": r.losses,
            "evals": [vars(e) for e in r.evals],
        }
        for r in results
    ]
    (args.out / "results.json").write_text(
        to_json({"settings": settings, "rows": rows, "curves": curves})
    )
    print(render(rows, COLUMNS, args.format, json_extra={"settings": settings}))
    print(
        f"wrote {loss_png}, {accuracy_png} and {args.out / 'results.json'} "
        f"({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    return 0
