"""Step time of this checkout against another git revision, interleaved round by round.

Run::

    python benchmarks/vs_revision.py --base 1710d44          # where issue 12 was filed
    python benchmarks/vs_revision.py --base HEAD~3 --scenarios mlp --structures diagonal

Each version runs in a worker process of its own that imports ``singd`` and the
scenarios of ``benchmarks/step_time.py`` from its own source tree (the base revision
is exported with ``git archive`` into a temporary directory; it must have
``benchmarks/step_time.py``). The workers run one CPU thread and never at the same
time: for every optimizer the coordinator asks each for one round of 10 training
steps in turn, in ABBA order over the rounds, so a drift of the machine's load hits
both versions alike. Two step-time tables from different times, by contrast, differ
by as much as the load did in between (20–30% on a shared 2-core machine).

Reported per optimizer and refresh interval: each version's median ms/step and ×SGD,
and **this ÷ base**, the median over rounds of the paired ratio. SGD runs the same way
in both versions; its this ÷ base is the control (1 within the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]

#: ``wall``: elapsed time. ``cpu``: the CPU time of the worker's (one) thread, which
#: leaves out the time the thread waits for a core: on a machine shared with other
#: jobs the rounds' spread shrinks several-fold (a 784-512-512-10 MLP's step varied 4×
#: in wall time and 1.2× in CPU time with a load of 4 on 2 cores), while cache and
#: memory-bandwidth contention still count.
#: (As ``singd.cli.measure.CLOCKS``; repeated here because a worker imports ``singd``
#: from the base revision, which may predate it.)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


# --- worker: runs under either source tree -------------------------------------------------
def worker(tree: Path) -> int:
    """Serve ``build``/``round`` requests (JSON lines on stdin) with ``tree``'s code."""
    sys.path.insert(0, str(tree / "benchmarks"))
    import step_time  # (this tree's copy)
    import torch

    import singd

    if not Path(singd.__file__).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"imported singd from {singd.__file__}, not from {tree}")
    torch.set_num_threads(1)
    out = sys.stdout
    sys.stdout = sys.stderr  # (only replies go to the coordinator)
    rounds: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "build":
            scenario = step_time.SCENARIOS[request["scenario"]]
            specs = step_time.optimizer_specs(request["families"], request["structures"])
            rounds = {
                spec.label: step_time._round(scenario, spec, request["T"], torch.device("cpu"))[0]
                for spec in specs
            }
            for work in rounds.values():
                work()  # warm-up: allocations, lazy state
            reply: dict[str, Any] = {"labels": list(rounds)}
        else:
            clock = CLOCKS[request.get("clock", "wall")]
            start = clock()
            rounds[request["label"]]()
            reply = {"seconds": clock() - start}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


class Worker:
    """A worker process for one source tree."""

    def __init__(self, tree: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree / "src"))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(tree)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,
        )

    def ask(self, **request: Any) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with status {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def export_revision(revision: str, into: Path) -> Path:
    """``git archive`` of ``revision`` extracted into ``into``; returns the tree."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision], cwd=ROOT, capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"git archive {revision}: {archive.stderr.decode().strip()}")
    with tempfile.TemporaryFile() as tar:
        tar.write(archive.stdout)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as files:
            files.extractall(into, filter="data")
    if not (into / "benchmarks" / "step_time.py").exists():
        raise SystemExit(f"revision {revision} has no benchmarks/step_time.py to time")
    return into


def compare(
    base: Worker,
    this: Worker,
    scenario: str,
    T: int,
    families: Sequence[str],
    structures: Sequence[str],
    repeats: int,
    bar: tqdm,
    clock: str = "wall",
) -> dict[str, dict[str, float]]:
    """Per optimizer: both versions' median ms/step and the median paired ratio."""
    request = {"op": "build", "scenario": scenario, "T": T}
    request |= {"families": list(families), "structures": list(structures)}
    labels = base.ask(**request)["labels"]
    if this.ask(**request)["labels"] != labels:
        raise SystemExit("the two versions name the optimizers differently")
    times: dict[str, dict[str, list[float]]] = {label: {"base": [], "this": []} for label in labels}
    for r in range(repeats):
        order = (("base", base), ("this", this)) if r % 2 == 0 else (("this", this), ("base", base))
        for label in labels:
            for name, w in order:
                times[label][name].append(w.ask(op="round", label=label, clock=clock)["seconds"])
            bar.update()
    steps = 10  # (step_time.ROUND_STEPS in both trees)
    result = {}
    for label, t in times.items():
        paired = [a / b for a, b in zip(t["this"], t["base"], strict=True)]
        result[label] = {
            "base": 1000 * statistics.median(t["base"]) / steps,
            "this": 1000 * statistics.median(t["this"]) / steps,
            "ratio": statistics.median(paired),
        }
    return result


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    """One Markdown table: per optimizer, per T, both versions and this ÷ base."""
    from singd.cli.report import Column, markdown_table

    columns = [Column("optimizer", "optimizer")]
    rows: dict[str, dict[str, object]] = {}
    for T, by_label in results.items():
        columns += [
            Column(f"base_T{T}", f"base ms T={T}", ".2f"),
            Column(f"this_T{T}", f"this ms T={T}", ".2f"),
            Column(f"ratio_T{T}", f"this÷base T={T}", ".2f"),
            Column(f"base_sgd_T{T}", f"base ×SGD T={T}", ".2f"),
            Column(f"this_sgd_T{T}", f"this ×SGD T={T}", ".2f"),
        ]
        sgd = by_label["SGD"]
        for label, row in by_label.items():
            rows.setdefault(label, {"optimizer": label}).update(
                {
                    f"base_T{T}": row["base"],
                    f"this_T{T}": row["this"],
                    f"ratio_T{T}": row["ratio"],
                    f"base_sgd_T{T}": row["base"] / sgd["base"],
                    f"this_sgd_T{T}": row["this"] / sgd["this"],
                }
            )
    return markdown_table(list(rows.values()), columns)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--scenarios", nargs="+", default=["cnn", "mlp", "tokens"])
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["adamw", "kfac", "ikfac", "singd"],
        help="families besides SGD (step_time.py's names)",
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        help="SINGD structures, named so that both revisions accept them (default: every "
        "structure step_time.py times)",
    )
    parser.add_argument("--T", nargs="+", type=int, default=[1, 10], dest="t_values")
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds per version")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the worker thread's CPU time (robust to other jobs)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    bad = [T for T in args.t_values if T < 1 or 10 % T]
    if bad:
        parser.error(f"--T values must divide 10, got {bad}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Compare (or, as ``--worker TREE``, serve one tree's rounds)."""
    if argv is None and sys.argv[1:2] == ["--worker"]:
        return worker(Path(sys.argv[2]))
    args = parse_args(argv)
    # (imported here: a worker must import singd and step_time from its own tree)
    from step_time import CLOCK_NAMES, _shown_arguments

    from singd.cli.optimizers import every_structure

    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"# Step time: this checkout against {args.base} ({commit or 'unknown commit'})",
        "",
        f"1 CPU thread per version ({args.clock} clock: {CLOCK_NAMES[args.clock]}), one "
        "version at a time, rounds of 10 steps interleaved "
        f"(ABBA), {args.repeats} rounds each after 1 warm-up; this÷base = median of the "
        "paired per-round ratios; SGD's is the control. Produced by `python "
        "benchmarks/vs_revision.py " + " ".join(_shown_arguments(argv)) + "`.",
    ]
    families = args.optimizers
    structures = args.structures if args.structures is not None else every_structure()
    optimizers = 1 + sum(len(structures) if f == "singd" else f != "sgd" for f in families)
    total = len(args.scenarios) * len(args.t_values) * args.repeats * optimizers
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = export_revision(args.base, Path(tmp))
        base, this = Worker(base_tree), Worker(ROOT)
        try:
            with tqdm(total=total, unit="round", disable=args.no_progress, file=sys.stderr) as bar:
                for scenario in args.scenarios:
                    bar.set_description(scenario)
                    results = {
                        T: compare(
                            base,
                            this,
                            scenario,
                            T,
                            families,
                            structures,
                            args.repeats,
                            bar,
                            args.clock,
                        )
                        for T in args.t_values
                    }
                    lines += ["", f"## {scenario}", "", table(results)]
        finally:
            base.close()
            this.close()
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
