"""ATen operations per training step and host reads in ``step()``, counted on a CPU (issue 12).

Run::

    python benchmarks/op_count.py                            # prints Markdown
    python benchmarks/op_count.py --out benchmarks/op_count.md
    python benchmarks/op_count.py --scenarios mlp24 --optimizers sgd singd --structures diagonal

On small and mid-size models a GPU step is bound by the host: every dispatched ATen
operation costs a kernel launch and some tens of microseconds of Python and
dispatcher time, whatever its size, and every read of a device value stalls the
pipeline. Both are deterministic and can be counted on a CPU
(``/work/shared/op_counting.md``; issue 12):

* **Operations**: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` counts
  every ATen operation below autograd — forward, backward and ``step()`` alike.
* **Host reads** in ``step()``: ``aten::_local_scalar_dense`` (what ``.item()``,
  ``float(t)``, ``bool(t)`` dispatch) and calls of ``Tensor.tolist/.item/.cpu/.numpy/
  __bool__/__float__/__int__/__index__`` (some do not dispatch), each counted once.
  torch.optim's per-parameter ``step`` counters are host tensors by design (not a
  device synchronisation on a GPU), so reads of tensors stored under ``"step"`` in
  the optimizer state are not counted; nor are reads of the step guard's verdicts
  (:mod:`singd.optim.guard`: on a GPU a non-blocking copy into pinned memory, read
  once an event says it has arrived; on a CPU the flags themselves, read at once).
* **Accelerator code path**: the structures choose some kernels by device
  (:func:`singd.structures._linalg.splits_work`: split products into cache-sized
  pieces on CPUs only); it is forced to the accelerator branch. torch.optim's SGD and
  AdamW are counted twice: with their CPU default (a loop over parameters; the
  issue's reference figures, and the ``×SGD`` column's reference) and with
  ``foreach=True``, their default on GPUs. So the counts describe what a GPU step
  dispatches.

Scenarios (the issue's): ``cnn`` — a VGG-style CNN, 3×3 convolutions 3→32→32,
max-pool, 32→64→64, max-pool, 64→128, max-pool, Linear 2048→256→100 with ReLUs, on
3×32×32 inputs, batch 32; ``mlp24`` — 24 ``Linear(64, 64)`` layers each followed by
tanh, then a ``Linear(64, 10)`` read-out, batch 32; ``resnet8`` (not the issue's: a
model with equal convolutions) — a 3×3 convolution 3→16, 8 residual blocks of two
equal 3×3 convolutions 16→16 (ReLU, no batch normalisation), global average pooling,
``Linear(16, 10)``, on 3×16×16 inputs, batch 32. Cross-entropy loss, random inputs and labels.

For each optimizer (SGD with momentum, AdamW, KFAC, IKFAC, INGD = SINGD-dense and
SINGD with every other structure) and refresh interval ``T``: after ``--warmup``
training steps, *train step* = one refresh step (zero_grad, forward, backward,
``step()``), *step()* = the ``step()`` of that step alone, *mean over T* = the mean
training step over the next ``T`` steps (one refresh, ``T − 1`` plain steps).
Hyper-parameters are those of ``benchmarks/step_time.py`` (β₂ = 10⁻³, β₁ = 10⁻²,
the CLI defaults otherwise); the counts do not depend on the values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode

from singd.cli.models import vgg_cnn
from singd.cli.optimizers import OptimizerSpec, build_optimizer, every_structure
from singd.cli.report import Column, markdown_table

#: Refresh intervals counted.
T_VALUES = (1, 10)

#: The published package's counts (singd 0.0.5, T = 1, one training step), by scenario
#: and the labels of this benchmark: the CNN's SGD/AdamW/diagonal/block/hierarchical/
#: INGD/IKFAC figures are issue 12's table, the rest were counted by
#: ``benchmarks/published_ops.py`` in the published package's own interpreter (which
#: reproduces the issue's figures exactly); ``--published-python`` counts them afresh.
PUBLISHED_T1: dict[str, dict[str, int]] = {
    "cnn": {
        "SGD": 129,
        "AdamW": 227,
        "SINGD-diagonal": 704,
        "SINGD-block_diagonal(30)": 2260,
        "SINGD-hierarchical(15, 15)": 2972,
        "SINGD-tril_toeplitz": 2104,
        "SINGD-triu_toeplitz": 2118,
        "INGD": 732,
        "IKFAC": 606,
    },
    "mlp24": {
        "SINGD-diagonal": 2407,
        "SINGD-block_diagonal(30)": 7957,
        "SINGD-hierarchical(15, 15)": 10507,
        "SINGD-tril_toeplitz": 7407,
        "SINGD-triu_toeplitz": 7457,
        "INGD": 2507,
        "IKFAC": 2057,
    },
}


def published_counts(python: str) -> dict[str, dict[str, int]]:
    """:data:`PUBLISHED_T1` counted afresh by ``benchmarks/published_ops.py`` under the
    published package's interpreter ``python`` (SGD and AdamW kept: torch's own)."""
    import json
    import subprocess

    worker = Path(__file__).with_name("published_ops.py")
    out = subprocess.run(
        [python, str(worker)], check=True, capture_output=True, text=True, cwd="/"
    ).stdout
    counts: dict[str, dict[str, int]] = json.loads(out.strip().splitlines()[-1])
    for scenario, torch_rows in (("cnn", ("SGD", "AdamW")),):
        counts[scenario] |= {k: PUBLISHED_T1[scenario][k] for k in torch_rows}
    return counts


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A model and its random batch."""

    title: str
    model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int


def issue_cnn(num_classes: int = 100) -> nn.Sequential:
    """The VGG-style CNN of issue 12 (module docstring)."""
    return vgg_cnn(num_classes, plan=(32, 32, "M", 64, 64, "M", 128, "M"))


def deep_mlp(depth: int = 24, width: int = 64, num_classes: int = 10) -> nn.Sequential:
    """``depth`` equal ``Linear(width, width)`` layers, each followed by tanh, and a
    ``Linear(width, num_classes)`` read-out (the issue's 24-layer MLP)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``relu(x + conv(relu(conv(x))))`` with two equal 3×3 convolutions (a ResNet basic
    block without batch normalisation)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def resnet_stage(blocks: int = 8, width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """A 3×3 convolution 3→``width``, ``blocks`` residual blocks of two equal 3×3
    convolutions ``width``→``width`` (:class:`ResidualBlock`), global average pooling
    and a ``Linear(width, num_classes)`` read-out: a residual stage's many equal
    convolutions."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        *[ResidualBlock(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


SCENARIOS: dict[str, Scenario] = {
    "cnn": Scenario(
        "VGG-style CNN (conv 3→32→32, pool, 32→64→64, pool, 64→128, pool, "
        "Linear 2048→256→100) on 3×32×32 inputs, batch 32",
        issue_cnn,
        (3, 32, 32),
        100,
        32,
    ),
    "mlp24": Scenario(
        "24 layers Linear(64, 64) + tanh, then Linear(64, 10), batch 32", deep_mlp, (64,), 10, 32
    ),
    "resnet8": Scenario(
        "conv 3→16, 8 residual blocks of two 3×3 conv 16→16 (ReLU, no batch norm), "
        "global average pool, Linear(16, 10) on 3×16×16 inputs, batch 32",
        resnet_stage,
        (3, 16, 16),
        10,
        32,
    ),
}

#: Optimizer families (``--optimizers``); ``singd`` expands to one entry per structure.
FAMILIES = ("sgd", "adamw", "kfac", "ikfac", "ingd", "singd")


def optimizer_specs(families: Sequence[str], structures: Sequence[str]) -> list[OptimizerSpec]:
    """SGD first (the reference), then the chosen families; SINGD-dense is listed as INGD."""
    specs = [OptimizerSpec("sgd")]
    for family in families:
        if family == "singd":
            specs += [OptimizerSpec("singd", s) for s in structures if s != "dense"]
        elif family != "sgd":
            specs.append(OptimizerSpec(family))
    return specs


# --- counting ------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched below autograd, and host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.scalar_reads = 0  # aten::_local_scalar_dense not inside a counted method
        self.by_name: dict[str, int] = {}
        self.inside_read = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        name = str(func.overloadpacket.__name__)
        self.by_name[name] = self.by_name.get(name, 0) + 1
        if func is torch.ops.aten._local_scalar_dense.default and not self.inside_read:
            self.scalar_reads += 1
        return func(*args, **(kwargs or {}))


#: Tensor methods that read a value back to the host (some do not dispatch an ATen op).
_READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_host_reads(counter: OpCounter, exempt: set[int]) -> Iterator[list[str]]:
    """Wrap the reading methods of ``torch.Tensor``; yields the list of reads made.

    Tensors whose ``id`` is in ``exempt`` (host-side step counters) are not counted.
    """
    reads: list[str] = []
    originals = {name: getattr(Tensor, name) for name in _READ_METHODS}

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def method(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter.inside_read or id(self) in exempt or getattr(self, "_singd_host_copy", 0):
                counter.inside_read += 1
                try:
                    return original(self, *args, **kwargs)
                finally:
                    counter.inside_read -= 1
            reads.append(name)
            counter.inside_read += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.inside_read -= 1

        return method

    for name, original in originals.items():
        setattr(Tensor, name, wrap(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)


@contextlib.contextmanager
def accelerator_code_path() -> Iterator[None]:
    """Make the structures take the branches they take on GPUs (module docstring)."""
    from singd.structures import _linalg

    original = _linalg.splits_work
    _linalg.splits_work = lambda X: False  # type: ignore[assignment]
    try:
        yield
    finally:
        _linalg.splits_work = original  # type: ignore[assignment]


def _step_counters(optimizer: Optimizer) -> set[int]:
    return {
        id(state["step"])
        for state in optimizer.state.values()
        if isinstance(state, dict) and isinstance(state.get("step"), Tensor)
    }


@dataclasses.dataclass(frozen=True)
class Counts:
    """The counts of one optimizer at one ``T``."""

    train_step: int
    step: int
    step_reads: int
    mean_train_step: float
    mean_step_reads: float


def label(spec: OptimizerSpec, foreach: bool) -> str:
    """Display name; ``foreach`` marks torch.optim's multi-tensor form."""
    return f"{spec.label} (foreach)" if foreach else spec.label


def build(spec: OptimizerSpec, T: int, model: nn.Module, foreach: bool = False) -> Optimizer:
    """The optimizer of ``spec`` with step_time's hyper-parameters.

    ``foreach`` (SGD and AdamW only): torch.optim's multi-tensor implementation, its
    default on GPUs; otherwise its CPU default, the per-parameter loop.
    """
    if spec.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=foreach)
    if spec.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=foreach)
    spec = dataclasses.replace(spec, hyperparameters={"lr": 1e-3, "lr_cov": 1e-2, "T": T})
    return build_optimizer(spec, model, loss_average="batch")


def count(
    scenario: Scenario, spec: OptimizerSpec, T: int, warmup: int = 1, foreach: bool = False
) -> Counts:
    """Counts of one optimizer at refresh interval ``T`` (module docstring).

    ``warmup`` is rounded up to a multiple of ``T`` so the counted step refreshes.
    """
    torch.manual_seed(0)
    model = scenario.model()
    optimizer = build(spec, T, model, foreach)
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(scenario.batch_size, *scenario.input_shape, generator=generator)
    y = torch.randint(scenario.num_classes, (scenario.batch_size,), generator=generator)
    loss_func = nn.CrossEntropyLoss()

    def forward_backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_func(model(X), y).backward()

    def counted_step(counter: OpCounter) -> tuple[int, int]:
        before = counter.ops, counter.scalar_reads
        with counting_host_reads(counter, _step_counters(optimizer)) as reads:
            optimizer.step()
        return counter.ops - before[0], counter.scalar_reads - before[1] + len(reads)

    warmup = -(-max(warmup, 1) // T) * T
    with accelerator_code_path():
        for _ in range(warmup):
            forward_backward()
            optimizer.step()
        totals, reads_total = 0, 0
        first: tuple[int, int, int] | None = None
        for _ in range(T):
            with OpCounter() as counter:
                forward_backward()
                step_ops, step_reads = counted_step(counter)
            if first is None:
                first = (counter.ops, step_ops, step_reads)
            totals += counter.ops
            reads_total += step_reads
    assert first is not None
    return Counts(first[0], first[1], first[2], totals / T, reads_total / T)


# --- report --------------------------------------------------------------------------
def measure(
    scenarios: Sequence[str],
    specs: Sequence[OptimizerSpec],
    t_values: Sequence[int],
    progress: bool,
) -> dict[str, dict[str, dict[int, Counts]]]:
    """Counts by scenario, optimizer label and T."""
    variants = [
        (spec, foreach)
        for spec in specs
        for foreach in ((False, True) if spec.name in ("sgd", "adamw") else (False,))
    ]
    jobs = [(s, v, T) for s in scenarios for v in variants for T in t_values]
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="op_count", file=sys.stderr)
    results: dict[str, dict[str, dict[int, Counts]]] = {}
    for name, (spec, foreach), T in jobs:
        results.setdefault(name, {}).setdefault(label(spec, foreach), {})[T] = count(
            SCENARIOS[name], spec, T, foreach=foreach
        )
        if bar is not None:
            bar.set_postfix_str(f"{name} {label(spec, foreach)} T={T}")
            bar.update()
    if bar is not None:
        bar.close()
    return results


def report(
    results: dict[str, dict[str, dict[int, Counts]]],
    t_values: Sequence[int],
    published: dict[str, dict[str, int]] | None = None,
) -> str:
    """The Markdown report; ``published``: the published package's counts
    (:data:`PUBLISHED_T1` by default)."""
    published = PUBLISHED_T1 if published is None else published
    lines = [
        "# Operations per step and host reads in `step()` (accelerator code path)",
        "",
        f"torch {torch.__version__}, {platform.machine()}; counted on the CPU with the "
        "accelerator code path forced (`benchmarks/op_count.py`, method in its docstring). "
        "Counts are deterministic: the same on any machine. *train* = one refresh step "
        "(zero_grad, forward, backward, `step()`), *step()* = its `step()` alone, *reads* = "
        "host reads in that `step()`, *mean* = mean training step (operations, host reads in "
        "`step()`) over T steps (one refresh).",
        "",
        "Produced by `" + " ".join(["python", "benchmarks/op_count.py", *sys.argv[1:]]) + "`.",
    ]
    for name, by_label in results.items():
        sgd = by_label["SGD"][t_values[0]].train_step
        lines += ["", f"## {name}: {SCENARIOS[name].title}", ""]
        columns = [Column("optimizer", "optimizer")]
        for T in t_values:
            columns += [
                Column(f"train{T}", f"train T={T}"),
                Column(f"ratio{T}", f"×SGD T={T}", ".2f"),
                Column(f"step{T}", f"step() T={T}"),
                Column(f"reads{T}", f"reads T={T}"),
                Column(f"mean{T}", f"mean T={T}", ".1f"),
                Column(f"mean_reads{T}", f"mean reads T={T}", ".1f"),
            ]
        if name in published:
            columns.append(Column("published", "published T=1"))
        rows: list[dict[str, Any]] = []
        for label, by_T in by_label.items():
            row: dict[str, Any] = {"optimizer": label}
            for T in t_values:
                c = by_T[T]
                row |= {
                    f"train{T}": c.train_step,
                    f"ratio{T}": c.train_step / sgd,
                    f"step{T}": c.step,
                    f"reads{T}": c.step_reads,
                    f"mean{T}": c.mean_train_step,
                    f"mean_reads{T}": c.mean_step_reads,
                }
            if name in published:
                row["published"] = published[name].get(label)
            rows.append(row)
        lines.append(markdown_table(rows, columns))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--optimizers", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--structures", nargs="+", default=None, help="default: every structure")
    parser.add_argument("--T", nargs="+", type=int, default=list(T_VALUES), dest="t_values")
    parser.add_argument("--out", type=Path, default=None, help="write the report here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--published-python",
        default=None,
        help="an interpreter with the published singd: count its column afresh "
        "(benchmarks/published_ops.py); default: the recorded figures",
    )
    args = parser.parse_args(argv)
    structures = args.structures if args.structures is not None else every_structure()
    specs = optimizer_specs(args.optimizers, structures)
    results = measure(args.scenarios, specs, args.t_values, not args.no_progress)
    published = published_counts(args.published_python) if args.published_python else None
    text = report(results, args.t_values, published)
    if args.out is not None:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
