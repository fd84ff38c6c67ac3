"""The ``singd`` command-line tool (install with ``pip install "singd[cli]"``).

Subcommands: ``singd train`` (one optimizer, digits or CIFAR, checkpoints),
``singd compare`` (every optimizer × precision: table and plots) and
``singd overhead`` (the poster's memory/time table, measured). The modules
below are reusable from Python, e.g. by ``benchmarks/step_time.py``:

* :mod:`singd.cli.data` — datasets (bundled digits, local CIFAR, random batches);
* :mod:`singd.cli.models` — the CNNs and MLPs;
* :mod:`singd.cli.optimizers` — optimizer names, tuned defaults, the factory;
* :mod:`singd.cli.runs` — precision modes, training steps and runs;
* :mod:`singd.cli.measure` — memory accounting and interleaved timing;
* :mod:`singd.cli.report` — Markdown/JSON/CSV output; :mod:`singd.cli.plots` — PNGs;
* :mod:`singd.cli.command` — the parser and the dispatch behind :func:`main`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

#: Import name → distribution name of what the ``cli`` extra installs.
CLI_DEPENDENCIES = {"tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def missing_dependencies() -> list[str]:
    """Distributions of the ``cli`` extra that are not installed."""
    return [
        dist for module, dist in CLI_DEPENDENCIES.items() if not importlib.util.find_spec(module)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``singd`` console script (see :func:`singd.cli.command.main`).

    Returns:
        The exit status: 0 on success, 1 if the ``cli`` extra is missing, 2 for an
        error in what was asked.
    """
    missing = missing_dependencies()
    if missing:
        print(
            f"singd: the command needs {', '.join(missing)}; install it with "
            "pip install 'singd[cli]'",
            file=sys.stderr,
        )
        return 1
    from singd.cli.command import main as run_command

    return run_command(argv)


__all__ = ["main", "missing_dependencies"]
