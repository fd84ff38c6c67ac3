"""The ``singd`` command: the parser, the subcommands and error reporting.

``main(argv)`` is the console-script entry point (``singd = "singd.cli:main"``) and
can be called in-process (tests): it returns the exit status instead of exiting,
except for argparse's own errors and ``--help``, which raise ``SystemExit`` as usual.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import singd
from singd.cli import compare, overhead, train
from singd.cli.options import CLIError


def build_parser() -> argparse.ArgumentParser:
    """The ``singd`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="singd",
        description="Train, compare and measure SINGD (structured inverse-free natural "
        "gradient descent) against SGD, AdamW and KFAC. Run `singd <command> --help` for "
        "each command's options.",
        epilog="start with: singd compare --quick",
    )
    parser.add_argument("--version", action="version", version=f"singd {singd.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, compare, overhead):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``singd`` command.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for an error in what was asked (the message goes to stderr).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except CLIError as error:
        print(f"singd {args.command}: error: {error}", file=sys.stderr)
        return 2
