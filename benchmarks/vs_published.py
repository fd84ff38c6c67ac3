"""This package against the published ``singd`` (PyPI 0.0.5): trajectories and step time.

The published package is never installed into this project: it lives in an interpreter
of its own (a separate virtual environment), and this script runs the same worker code
under both interpreters, each importing whichever ``singd`` it has, through the public
API both share (``from singd.optim.optimizer import SINGD``)::

    python -m venv /tmp/published && /tmp/published/bin/pip install torch==2.13.0 singd==0.0.5
    python benchmarks/vs_published.py --published-python /tmp/published/bin/python

Reports, for every structure the published code offers, INGD and IKFAC and T ∈ {1, 3}:

* **trajectories**: the largest relative difference of any parameter over 12 float32
  steps on a small tanh MLP (201/151/41 inputs, so Toeplitz takes its FFT route) and a
  small tanh CNN. ReLU nets are avoided on purpose: a pre-activation within round-off of
  zero flips between implementations and the trajectories then part at 1e-4 for a reason
  that is not the optimizer's.
  ``block30diagonal`` differs by design: the published block-diagonal code reads the
  stored blocks transposed where Kᵀ is needed (its ``rmatmat(X)`` returns K·X, its
  ``from_inner(X)`` Π̂(K X Xᵀ Kᵀ) and ``from_inner()`` K Kᵀ — checked black-box), while
  this package computes Kᵀ·X, Π̂(Kᵀ X Xᵀ K) and Π̂(KᵀK) as the paper defines them. The
  row "published orientation emulated" patches exactly those three operations in this
  package's worker (and K Kᵀ X, which the preconditioning forms from the blocks'
  K_i K_iᵀ, as K K X) and shows that nothing else differs.
* **settings**: the same over 15 optimizer settings (summed loss, normalize_lr_cov,
  mixed structures, KFAC-reduce, weight sharing, grouped and dilated convolutions,
  gradient-scale bookkeeping, bfloat16 factors), dense factors unless named, T ∈ {1, 2}.
* **step time**: median of rounds of 10 steps on the three models of
  ``benchmarks/step_time.py`` (one CPU thread), each implementation relative to SGD in
  its own process (SGD timed first and last, the faster counts: a process's first
  steps are slowed by fresh memory), and this package's time over the published one
  (< 1: faster). The two workers run alternately, twice each, and the faster of the two
  runs counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

#: Label of the trajectory row with the published block-diagonal orientation emulated.
EMULATED = "block30diagonal (published orientation emulated)"
TRAJECTORY_STEPS = 12
ROUND_STEPS = 10
HYPER = {"lr": 5e-2, "momentum": 0.9, "damping": 1e-3, "alpha1": 0.5, "weight_decay": 1e-3}


# --- worker: runs under either interpreter -----------------------------------------------


def _models():
    """``singd/cli/models.py`` loaded by path (it needs only torch), so that both
    interpreters build the same models without importing this package."""
    spec = importlib.util.spec_from_file_location("_models", ROOT / "src/singd/cli/models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tanh(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.Tanh())
        else:
            _tanh(child)
    return model


def _emulate_published_block_orientation() -> None:
    """Make this package's block-diagonal read Kᵀ as K where the published code does."""
    from singd.structures.block_diagonal import BlockDiagonalMatrix as Matrix

    def from_inner(self, X=None):
        b, last = self.blocks, self.last
        if X is None:
            return self._like({"blocks": b @ b.mT, "last": last @ last.T})
        gram = self.structure.from_mat_inner(X.to(self.dtype))
        return self._like({"blocks": b @ (gram.blocks @ b.mT), "last": last @ (gram.last @ last.T)})

    Matrix.from_inner = from_inner
    Matrix.rmatmat = Matrix.matmat
    # the preconditioning's K Kᵀ X (one product with the blocks' K_i K_iᵀ) read as K K X
    Matrix.outer_matmat = lambda self, X: self.matmat(self.matmat(X))


def _trajectory(SINGD, model, batches, structure, kfac_like, T) -> list[torch.Tensor]:
    optim = SINGD(
        model, T=T, lr_cov=5e-2, structures=(structure, structure), kfac_like=kfac_like, **HYPER
    )
    for X, y in batches:
        optim.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optim.step()
    return [p.detach().clone() for p in model.parameters()]


def _trajectories(
    SINGD, models, structures: list[str], ours: bool
) -> dict[str, list[torch.Tensor]]:
    nets = {
        "MLP": (lambda: _tanh(models.mlp((200, 150, 40, 10))), (200,)),
        "CNN": (
            lambda: nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.Tanh(),
                nn.Conv2d(8, 16, 3, stride=2),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(16 * 7 * 7, 10),
            ),
            (3, 16, 16),
        ),
    }
    out = {}
    rows = [(s, s) for s in structures] + ([(EMULATED, "block30diagonal")] if ours else [])
    for label, structure in rows:
        if label == EMULATED:
            _emulate_published_block_orientation()
        for net, (build, shape) in nets.items():
            gen = torch.Generator().manual_seed(0)
            batches = [
                (torch.randn(32, *shape, generator=gen), torch.randint(0, 10, (32,), generator=gen))
                for _ in range(TRAJECTORY_STEPS)
            ]
            for kfac_like in (False, True):
                for T in (1, 3):
                    torch.manual_seed(0)
                    key = f"{label}|{net}|{kfac_like}|{T}"
                    out[key] = _trajectory(SINGD, build(), batches, structure, kfac_like, T)
    return out


class _TokenMLP(nn.Module):
    """Two linear layers applied to every position of ``[batch, positions, 12]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 20), nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _small_cnn(groups: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=2, dilation=dilation, groups=groups),
        nn.Tanh(),
        nn.Conv2d(8, 6, 3, stride=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(5),
    )


def _configurations() -> dict[str, tuple]:
    """name → (model, input shape, SINGD keywords, loss); dense factors unless named."""

    def mlp():
        return nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 5))

    bf16 = (torch.bfloat16, torch.bfloat16)
    return {
        "loss_average=None (summed loss)": (mlp, (30,), {"loss_average": None}, "sum"),
        "normalize_lr_cov": (mlp, (30,), {"normalize_lr_cov": True}, "mean"),
        "structures (dense, diagonal)": (mlp, (30,), {"structures": ("dense", "diagonal")}, "mean"),
        "structures (diagonal, hierarchical15_15)": (
            mlp,
            (30,),
            {"structures": ("diagonal", "hierarchical15_15")},
            "mean",
        ),
        "alpha1=0, weight_decay=1e-2": (mlp, (30,), {"alpha1": 0.0, "weight_decay": 1e-2}, "mean"),
        "momentum=0": (mlp, (30,), {"momentum": 0.0}, "mean"),
        "IKFAC": (mlp, (30,), {"kfac_like": True}, "mean"),
        "init_grad_scale=1024, loss scaled by 1024": (
            mlp,
            (30,),
            {"init_grad_scale": 1024.0},
            "scaled",
        ),
        "tokens, expand, batch+sequence": (
            _TokenMLP,
            (7, 12),
            {"loss_average": "batch+sequence", "kfac_approx": "expand"},
            "tokens",
        ),
        "tokens, reduce, batch+sequence": (
            _TokenMLP,
            (7, 12),
            {"loss_average": "batch+sequence", "kfac_approx": "reduce"},
            "tokens",
        ),
        "tokens, expand, batch": (_TokenMLP, (7, 12), {"loss_average": "batch"}, "tokens"),
        "conv, reduce": (_small_cnn, (4, 10, 10), {"kfac_approx": "reduce"}, "mean"),
        "conv, groups=2, dilation=2": (lambda: _small_cnn(2, 2), (4, 10, 10), {}, "mean"),
        "conv, groups=2, reduce": (
            lambda: _small_cnn(groups=2),
            (4, 10, 10),
            {"kfac_approx": "reduce"},
            "mean",
        ),
        "preconditioner_dtype bfloat16": (mlp, (30,), {"preconditioner_dtype": bf16}, "mean"),
    }


def _configuration_trajectories(SINGD) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, (build, shape, keywords, loss) in _configurations().items():
        for T in (1, 2):
            torch.manual_seed(0)
            model = build()
            gen = torch.Generator().manual_seed(1)
            labels = (8, shape[0]) if loss == "tokens" else (8,)
            batches = [
                (torch.randn(8, *shape, generator=gen), torch.randint(0, 5, labels, generator=gen))
                for _ in range(8)
            ]
            model(batches[0][0])  # materialise lazy layers
            optim = SINGD(model, lr=5e-2, lr_cov=5e-2, damping=1e-3, T=T, **keywords)
            for X, y in batches:
                optim.zero_grad()
                logits = model(X)
                reduction = "sum" if loss == "sum" else "mean"
                value = nn.functional.cross_entropy(
                    logits.flatten(0, -2), y.flatten(), reduction=reduction
                )
                if loss == "scaled":
                    (1024.0 * value).backward()
                    optim.set_current_grad_scale(1024.0)
                else:
                    value.backward()
                optim.step()
            out[f"{name}|{T}"] = [p.detach().clone() for p in model.parameters()]
    return out


def _scenarios(models) -> dict[str, tuple]:
    """(model builder, input shape, classes, batch, loss_average) as in step_time.py."""
    return {
        "cnn": (lambda: models.vgg_cnn(100), (3, 32, 32), 100, 32, "batch"),
        "mlp": (lambda: models.mlp((784, 512, 512, 10)), (784,), 10, 128, "batch"),
        "tokens": (
            lambda: models.tokenwise_mlp(128, 256, 10),
            (64, 128),
            10,
            16,
            "batch+sequence",
        ),
    }


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (timings on an accelerator end there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_ms(
    model: nn.Module, optim, X: torch.Tensor, y: torch.Tensor, rounds: int
) -> float:
    """Median over ``rounds`` rounds of ROUND_STEPS steps (after one warm-up round), in ms."""

    def one_round() -> None:
        for _ in range(ROUND_STEPS):
            optim.zero_grad()
            logits = model(X)
            nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten()).backward()
            optim.step()

    one_round()
    measured = []
    for _ in range(rounds):
        _synchronize(X.device)
        start = time.perf_counter()
        one_round()
        _synchronize(X.device)
        measured.append(time.perf_counter() - start)
    return 1000 * statistics.median(measured) / ROUND_STEPS


def _step_times(
    SINGD, models, structures: list[str], rounds: int, device: torch.device
) -> dict[str, float]:
    times = {}
    for name, (build, shape, classes, batch, average) in _scenarios(models).items():
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(batch, *shape, generator=gen).to(device)
        label_shape = (batch, shape[0]) if len(shape) == 2 else (batch,)
        y = torch.randint(0, classes, label_shape, generator=gen).to(device)
        configs = [
            (f"{s}{' IKFAC' if kl else ''}", s, kl, T)
            for s in structures
            for kl in ((False, True) if s == "dense" else (False,))
            for T in (1, 10)
        ]
        # SGD first and last: the first runs of a process are slowed by fresh memory
        for label, structure, kfac_like, T in [
            ("SGD", None, False, 1),
            *configs,
            ("SGD", None, False, 1),
        ]:
            torch.manual_seed(0)
            model = build().to(device)
            if structure is None:
                optim = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            else:
                optim = SINGD(
                    model,
                    lr=1e-3,
                    lr_cov=1e-2,
                    T=T,
                    structures=(structure, structure),
                    kfac_like=kfac_like,
                    loss_average=average,
                )
            key = f"{name}|{label}|{T}"
            ms = _median_step_ms(model, optim, X, y, rounds)
            times[key] = min(ms, times.get(key, ms))
    return times


def worker(
    out: Path, ours: bool, structures: list[str], rounds: int, what: str, device: str = "cpu"
) -> None:
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import singd
    from singd.optim.optimizer import SINGD

    models = _models()
    result = {"singd": str(Path(singd.__file__).parent), "device": "one CPU thread"}
    if device != "cpu":
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
        result["device"] = f"step times on {name}"
    if what in ("all", "times"):
        result["times"] = _step_times(SINGD, models, structures, rounds, torch.device(device))
    if what in ("all", "trajectories"):
        result["trajectories"] = _trajectories(SINGD, models, structures, ours)
        result["configurations"] = _configuration_trajectories(SINGD)
    torch.save(result, out)


# --- parent: runs both, compares -----------------------------------------------------------


def published_structures() -> tuple[str, ...]:
    """The structures of the published code, by its names (the parent runs this package)."""
    from singd.cli.optimizers import PUBLISHED_STRUCTURES

    return PUBLISHED_STRUCTURES


def _run(python: str, ours: bool, out: Path, rounds: int, what: str, device: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if ours:
        env["PYTHONPATH"] = str(ROOT / "src")
    args = [python, __file__, "--worker", str(out), "--rounds", str(rounds), "--what", what]
    args += ["--device", device]
    args += ["--structures", *published_structures()]
    subprocess.run([*args, *(["--ours"] if ours else [])], check=True, env=env, cwd=ROOT)
    return torch.load(out)


def _largest_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b, strict=True))


def report(ours: dict, published: dict) -> str:
    lines = [
        "# This package against the published singd",
        "",
        f"ours: `{ours['singd']}`; published: `{published['singd']}`; torch "
        f"{torch.__version__}, {ours.get('device', 'one CPU thread')}. Produced by "
        "`python benchmarks/vs_published.py`.",
    ]
    if "trajectories" in ours:
        lines += [
            "",
            f"## Trajectories: largest relative parameter difference after {TRAJECTORY_STEPS} "
            "float32 steps",
            "",
            "| structure | net | INGD T=1 | INGD T=3 | IKFAC T=1 | IKFAC T=3 |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        theirs = published["trajectories"]
        for label in [*published_structures(), EMULATED]:
            structure = "block30diagonal" if label == EMULATED else label
            for net in ("MLP", "CNN"):
                cells = []
                for kfac_like in (False, True):
                    for T in (1, 3):
                        a = theirs[f"{structure}|{net}|{kfac_like}|{T}"]
                        b = ours["trajectories"][f"{label}|{net}|{kfac_like}|{T}"]
                        cells.append(f"{_largest_relative_difference(a, b):.1e}")
                lines.append(f"| {label} | {net} | " + " | ".join(cells) + " |")
    if "configurations" in ours:
        lines += [
            "",
            "## Trajectories over optimizer settings: largest relative parameter difference "
            "after 8 float32 steps",
            "",
            "| setting | T=1 | T=2 |",
            "| --- | ---: | ---: |",
        ]
        theirs, mine = published["configurations"], ours["configurations"]
        for name in _configurations():
            cells = [
                f"{_largest_relative_difference(theirs[f'{name}|{T}'], mine[f'{name}|{T}']):.1e}"
                for T in (1, 2)
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "times" in ours:
        lines += [
            "",
            "## Step time (ms/step; ×SGD in the same process; ours ÷ published)",
        ]
        for scenario in ("cnn", "mlp", "tokens"):
            lines += [
                "",
                f"### {scenario}",
                "",
                "| structure | T | published ms | ours ms | published ×SGD | ours ×SGD "
                "| ours ÷ published |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            sgd = {k: d["times"][f"{scenario}|SGD|1"] for k, d in (("o", ours), ("p", published))}
            for key, t_ours in ours["times"].items():
                name, label, T = key.split("|")
                if name != scenario or label == "SGD":
                    continue
                t_pub = published["times"][key]
                lines.append(
                    f"| {label} | {T} | {t_pub:.2f} | {t_ours:.2f} | {t_pub / sgd['p']:.2f} | "
                    f"{t_ours / sgd['o']:.2f} | {t_ours / t_pub:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--published-python",
        help="an interpreter whose environment has the published singd (and not this one)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument(
        "--what", choices=("all", "trajectories", "times"), default="all", help="what to run"
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the step times are measured (default: cpu; the trajectories stay on "
        "the CPU, in float32)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--structures", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.ours, args.structures, args.rounds, args.what, args.device)
        return 0
    if args.published_python is None:
        parser.error("--published-python is required (see the module docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[dict]] = {"ours": [], "published": []}
        for repeat in range(2 if args.what != "trajectories" else 1):
            for who, python in (("published", args.published_python), ("ours", sys.executable)):
                out = Path(tmp) / f"{who}{repeat}.pt"
                runs[who].append(
                    _run(python, who == "ours", out, args.rounds, args.what, args.device)
                )
    merged = {}
    for who, results in runs.items():
        merged[who] = dict(results[0])
        if "times" in results[0]:
            merged[who]["times"] = {
                k: min(r["times"][k] for r in results) for k in results[0]["times"]
            }
    text = report(merged["ours"], merged["published"])
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
