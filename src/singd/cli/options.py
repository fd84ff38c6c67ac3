"""Argument types and option groups shared by the subcommands.

Each type converter raises ``argparse.ArgumentTypeError`` with a message that says
what is valid, so argparse prints ``singd train: error: argument --lr: …`` and exits
with status 2.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from singd.cli.report import FORMATS
from singd.optim.validation import BOUNDS
from singd.structures import available_structures, parse_structure


class CLIError(Exception):
    """An error in what the user asked for, reported as ``singd <command>: error: …``."""


def _file_in_the_way(path: Path, option: str) -> None:
    """Refuse a path one of whose parent folders is a file."""
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                raise CLIError(
                    f"{option} {str(path)!r} cannot be written: {str(above)!r} is a file, "
                    "not a folder."
                )
            return


def check_output_file(path: Path, option: str) -> None:
    """Fail before any training if ``path`` cannot be written as a file.

    Refuses a folder, a path under a file and a place that cannot be written (the
    folders above ``path`` are created, as the write would create them). A file that
    exists is fine (it is replaced).

    Raises:
        CLIError: Saying which option and why.
    """
    if path.is_dir():
        raise CLIError(
            f"{option} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'run.pt')!r}."
        )
    _file_in_the_way(path, option)
    probe = path.with_name(path.name + ".tmp")  # the name the checkpoint is written to first
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
        existed = probe.exists()
        with probe.open("ab"):  # (appending to nothing: an existing file keeps its bytes)
            pass
        if not existed:
            probe.unlink()
    except OSError as error:
        raise CLIError(
            f"{option} {str(path)!r} cannot be written: {error.strerror or error}."
        ) from None


def check_output_folder(path: Path, option: str) -> None:
    """Fail before any training if files cannot be written into the folder ``path``.

    Raises:
        CLIError: For a file in the way, a path under a file or an unwritable place.
    """
    _file_in_the_way(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise CLIError(
            f"{option} {str(path)!r} cannot be used as a folder to write to: "
            f"{error.strerror or error}."
        ) from None


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


def bounded(name: str) -> Callable[[str], float]:
    """The argparse type of hyper-parameter ``name``, checked against the library's bound.

    The bounds are :data:`singd.optim.validation.BOUNDS`, the table ``SINGD`` and
    ``KFAC`` check their arguments with, so the command accepts exactly what the
    library does (optimizer-specific and joint bounds, e.g. β₁ against λ, are
    checked when the optimizer's settings are resolved: :class:`OptimizerSpec`).
    """
    bound = BOUNDS[name]

    def parse(text: str) -> float:
        try:
            value: float = int(text) if bound.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bound.describe()}, got {text!r}") from None
        try:
            return bound.check(value)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error).rstrip(".")) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def seed_int(text: str) -> int:
    """A seed torch.manual_seed accepts: an integer in [0, 2⁶⁴ − 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(
            f"expected a seed in [0, 2**64 - 1] (what torch.manual_seed accepts), got {value}"
        )
    return value


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

    def bounds(name: str) -> str:
        return BOUNDS[name].describe().removeprefix("a number ").removeprefix("an integer ")

    group.add_argument(
        "--lr", type=bounded("lr"), help=f"learning rate (β₂ in the paper; {bounds('lr')})"
    )
    group.add_argument(
        "--momentum",
        type=bounded("momentum"),
        help=f"heavy-ball momentum of the parameters (α₂; {bounds('momentum')})",
    )
    group.add_argument(
        "--weight-decay",
        type=bounded("weight_decay"),
        help="weight decay (γ; coupled for SGD/KFAC/SINGD, decoupled for AdamW; "
        f"{bounds('weight_decay')})",
    )
    group.add_argument(
        "--damping",
        type=bounded("damping"),
        help=f"damping λ (KFAC, IKFAC, INGD, SINGD; {bounds('damping')})",
    )
    group.add_argument(
        "--lr-cov",
        type=bounded("lr_cov"),
        help="factor step size β₁ (SINGD family; below 1 + α₁, below 2 for IKFAC, and "
        "β₁(λ − 1) < 2) or statistics EMA weight (KFAC; in [0, 1])",
    )
    group.add_argument(
        "--alpha1",
        type=bounded("alpha1"),
        help=f"Riemannian momentum α₁ of the factors (INGD, SINGD; {bounds('alpha1')})",
    )
    group.add_argument(
        "--T",
        type=bounded("T"),
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
