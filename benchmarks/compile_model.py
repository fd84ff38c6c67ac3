"""A ``torch.compile``d resnet18 with SINGD attached: graph breaks, recompiles, step time.

Run::

    python benchmarks/compile_model.py                      # resnet18, 3×64×64, batch 8
    python benchmarks/compile_model.py --image-size 224 --batch 64 --device cuda
    python benchmarks/compile_model.py --sgd                # also SGD, the reference

The model is torchvision's resnet18 in plain ``torch.nn`` (:func:`singd.cli.models.resnet`,
same layers and parameter count) with SINGD-diagonal attached (every convolution and the
head captured; BatchNorm on the fallback). Printed, in one run:

* **graph breaks** and graphs of ``torch._dynamo.explain`` on one forward, with the
  reasons that name singd (there should be none);
* **compiles** after the first training step and after the last: ``torch.compile``
  (Inductor, ``fullgraph=False``) of the model, steps with ``T`` (default 2, so refresh
  and plain steps alternate), ``optimizer.step()`` eager. Equal counts mean no
  recompile after warm-up;
* **step time**: the mean training step (zero_grad, forward, backward, ``step()``) over
  the timed steps, eager against compiled, and their ratio. One short run on a shared
  machine: a rough figure, not a table for the docs.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.utils import counters

from singd import SINGD
from singd.cli.models import resnet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optim: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    warmup: int,
    steps: int,
    after_first: Callable[[], None] | None = None,
) -> float:
    """Mean seconds per training step over ``steps`` steps after ``warmup`` ones."""
    for i in range(warmup + steps):
        if i == warmup:
            sync(X.device)
            start = time.perf_counter()
        optim.zero_grad()
        nn.functional.cross_entropy(forward(X), y).backward()
        optim.step()
        if i == 0 and after_first is not None:
            after_first()
    sync(X.device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--T", type=int, default=2, help="SINGD's refresh interval")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sgd", action="store_true", help="also time SGD (the reference)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    initial = resnet(num_classes=100).to(device)
    X = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    print(
        f"resnet18 ({sum(p.numel() for p in initial.parameters()):,} parameters), "
        f"3×{args.image_size}×{args.image_size}, batch {args.batch}, {device}, "
        f"torch {torch.__version__}, SINGD-diagonal T={args.T}"
    )

    def singd(model: nn.Module) -> SINGD:
        return SINGD(model, T=args.T, lr=1e-3, lr_cov=1e-2, structures=("diagonal", "diagonal"))

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    model = copy.deepcopy(initial)
    singd(model)
    explained = torch._dynamo.explain(model)(X)
    ours = [r for r in explained.break_reasons if "singd" in str(r).lower()]
    print(
        f"graph breaks: {explained.graph_break_count} ({len(ours)} naming singd), "
        f"graphs: {explained.graph_count}"
    )
    for reason in ours[:3]:
        print("  ", str(reason.reason).splitlines()[0])

    rows = [("SINGD", singd)] + ([("SGD", sgd)] if args.sgd else [])
    for label, make in rows:
        model = copy.deepcopy(initial)
        eager = timed_steps(model, make(model), X, y, args.warmup, args.steps)
        torch._dynamo.reset()
        counters.clear()
        model = copy.deepcopy(initial)
        compiled_model = torch.compile(model)
        warm: dict[str, int] = {}
        compiled = timed_steps(
            compiled_model,
            make(model),
            X,
            y,
            args.warmup,
            args.steps,
            after_first=lambda warm=warm: warm.update(counters["stats"]),
        )
        final = dict(counters["stats"])
        print(
            f"{label}: graphs compiled after step 1: {warm.get('unique_graphs', 0)}, after "
            f"step {args.warmup + args.steps}: {final.get('unique_graphs', 0)}; graph breaks "
            f"while training: {sum(counters['graph_break'].values())}; step eager "
            f"{eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms, "
            f"eager/compiled {eager / compiled:.2f}"
        )


if __name__ == "__main__":
    main()
