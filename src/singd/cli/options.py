"""Argument types and option groups shared by the subcommands.

Each type converter raises ``argparse.ArgumentTypeError`` with a message that says
what is valid, so argparse prints ``singd train: error: argument --lr: …`` and exits
with status 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from singd.cli.report import FORMATS
from singd.structures import available_structures, parse_structure


class CLIError(Exception):
    """An error in what the user asked for, reported as ``singd <command>: error: …``."""


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
    return value


def _float(text: str, check: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and check(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _float(text, lambda v: v > 0, "a number > 0")


def nonnegative_float(text: str) -> float:
    """A finite number ≥ 0."""
    return _float(text, lambda v: v >= 0, "a number ≥ 0")


def unit_interval(text: str) -> float:
    """A number in [0, 1) (momenta)."""
    return _float(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def structure_name(text: str) -> str:
    """A structure string that :func:`singd.structures.parse_structure` accepts."""
    try:
        parse_structure(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"unknown structure {text!r}; valid: {', '.join(available_structures())}"
        ) from None
    return text


def device(text: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`singd.cli.runs.resolve_device`)."""
    from singd.cli.runs import resolve_device

    try:
        return resolve_device(text)
    except (ValueError, RuntimeError) as error:
        reason = str(error) if isinstance(error, ValueError) else f"unknown device {text!r}"
        raise argparse.ArgumentTypeError(f"{reason}; valid: auto, cpu, cuda, cuda:N") from None


def add_hyperparameter_options(parser: argparse.ArgumentParser) -> None:
    """``--lr``, ``--momentum``, … with defaults of None (= the optimizer's default)."""
    group = parser.add_argument_group(
        "hyper-parameters (default: the optimizer's tuned value, listed at the end of "
        "`singd train --help`)"
    )
    group.add_argument("--lr", type=positive_float, help="learning rate (β₂ in the paper)")
    group.add_argument(
        "--momentum", type=unit_interval, help="heavy-ball momentum of the parameters (α₂)"
    )
    group.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        help="weight decay (γ; coupled for SGD/KFAC/SINGD, decoupled for AdamW)",
    )
    group.add_argument(
        "--damping", type=nonnegative_float, help="damping λ (KFAC, IKFAC, INGD, SINGD)"
    )
    group.add_argument(
        "--lr-cov",
        type=nonnegative_float,
        help="factor step size β₁ (SINGD family) or statistics EMA weight (KFAC)",
    )
    group.add_argument(
        "--alpha1", type=unit_interval, help="Riemannian momentum α₁ of the factors (INGD, SINGD)"
    )
    group.add_argument(
        "--T",
        type=positive_int,
        dest="T",
        help="refresh the preconditioner every T steps (KFAC, IKFAC, INGD, SINGD)",
    )


HYPERPARAMETER_KEYS = ("lr", "momentum", "weight_decay", "damping", "lr_cov", "alpha1", "T")


def hyperparameter_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The hyper-parameters given on the command line."""
    return {k: getattr(args, k) for k in HYPERPARAMETER_KEYS if getattr(args, k, None) is not None}


def add_run_options(
    parser: argparse.ArgumentParser,
    *,
    default_device: str = "auto",
    default_threads: int | None = None,
    threads_note: str = "",
) -> None:
    """``--device``, ``--threads``, ``--format`` and ``--no-progress``."""
    group = parser.add_argument_group("execution and output")
    group.add_argument(
        "--device",
        type=device,
        default=default_device,
        help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N' "
        f"(default: {default_device})",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=default_threads,
        help="CPU threads for PyTorch (torch.set_num_threads; default: "
        + (f"{default_threads}{threads_note})" if default_threads else "PyTorch's choice)"),
    )
    group.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="output on stdout: a Markdown 'table', 'json' or 'csv' (default: table); "
        "progress bars and notes go to stderr",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar (stderr)")


def apply_threads(args: argparse.Namespace) -> None:
    """Honour ``--threads``."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
