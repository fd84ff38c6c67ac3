"""PNG plots of ``singd compare``: loss curves and test accuracy against wall time.

Figures are drawn with matplotlib's object API on an Agg canvas: no pyplot, no
global backend switch, no display needed. One panel per precision mode, one
colour per optimizer (the same in every panel and in both plots).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from singd.cli.runs import RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Steps averaged by the loss curves' moving average (mini-batch losses are noisy).
SMOOTHING = 10


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _style(label: str) -> str:
    """Dashed lines for the structured SINGD variants, solid for the rest."""
    return "--" if label.startswith("SINGD-") else "-"


def _figure(results: Sequence[RunResult]) -> tuple[Figure, dict[str, Any], dict[str, str]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    precisions = list(dict.fromkeys(r.precision for r in results))
    fig = Figure(figsize=(5.0 * len(precisions), 3.8), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(precisions), squeeze=False, sharey=True)[0]
    labels = list(dict.fromkeys(r.label for r in results))
    palette = [f"C{i}" for i in range(10)] + ["black", "gray", "olive", "navy"]
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    return fig, dict(zip(precisions, axes, strict=True)), colours


def plot_loss_curves(results: Sequence[RunResult], path: str | Path) -> Path:
    """Training loss per step (moving average over :data:`SMOOTHING` steps), log scale.

    Returns:
        The written PNG's path.
    """
    fig, axes, colours = _figure(results)
    for r in results:
        ax = axes[r.precision]
        steps = range(1, len(r.losses) + 1)
        ax.plot(
            steps,
            _moving_average(r.losses, SMOOTHING),
            color=colours[r.label],
            ls=_style(r.label),
            lw=1.2,
        )
    for precision, ax in axes.items():
        ax.set_title(f"training loss ({precision})")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    first = next(iter(axes.values()))
    first.set_ylabel(f"mini-batch loss ({SMOOTHING}-step average)")
    _legend(fig, colours)
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def plot_accuracy_vs_time(results: Sequence[RunResult], path: str | Path) -> Path:
    """Test accuracy against training wall time (evaluations excluded), log time axis.

    The log axis keeps fast and slow optimizers readable in one panel; the
    evaluation before the first step (time 0) is left out.

    Returns:
        The written PNG's path.
    """
    fig, axes, colours = _figure(results)
    for r in results:
        ax = axes[r.precision]
        points = [e for e in r.evals if e.seconds > 0]
        ax.plot(
            [e.seconds for e in points],
            [100.0 * e.accuracy for e in points],
            color=colours[r.label],
            ls=_style(r.label),
            lw=1.2,
            marker=".",
            ms=3,
        )
    for precision, ax in axes.items():
        ax.set_title(f"test accuracy ({precision})")
        ax.set_xlabel("training time [s] (log scale)")
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    next(iter(axes.values())).set_ylabel("test accuracy [%]")
    _legend(fig, colours)
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _legend(fig: Figure, colours: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, ls=_style(label), lw=1.5, label=label)
        for label, c in colours.items()
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
