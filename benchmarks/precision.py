"""SINGD in pure bfloat16 vs float32 on scikit-learn's digits, with KFAC beside it.

Trains the small digits CNN with every method in float32 and in *pure* bfloat16
(parameters, activations, gradients and factors all bf16; KFAC's statistics and
inverses bf16 too — PyTorch has no bf16 inversion, so the inverse is computed in
float32 and rounded to bf16), same seeds and budget, and reports the final test
accuracy, the train loss and whether any parameter or factor became non-finite.

    python benchmarks/precision.py [--epochs 12] [--seeds 0 1 2] [--out docs/precision.md]
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch
from tqdm import tqdm

from singd import KFAC
from singd.cli.data import epoch_batches, load_digits
from singd.cli.measure import tensors_in
from singd.cli.models import digits_cnn
from singd.cli.optimizers import DEFAULT_HYPERPARAMETERS, OptimizerSpec, build_optimizer
from singd.cli.runs import Precision, evaluate, train_step

METHODS = ("sgd", "adamw", "kfac", "ikfac", "ingd", "singd:diagonal", "singd:block30diagonal")


@dataclass
class Outcome:
    accuracy: float
    train_loss: float
    finite: bool


def build(method: str, model: torch.nn.Module, dtype: torch.dtype) -> torch.optim.Optimizer:
    name, _, structure = method.partition(":")
    if name == "kfac":  # statistics and inverses in the model's dtype
        hp = DEFAULT_HYPERPARAMETERS["kfac"]
        return KFAC(
            model, inverse_dtype=dtype, T=int(hp["T"]), **{k: v for k, v in hp.items() if k != "T"}
        )
    return build_optimizer(OptimizerSpec(name, structure or None), model)


def train(method: str, precision: str, seed: int, epochs: int, batch_size: int = 64) -> Outcome:
    data = load_digits()
    mode = Precision(precision)
    dtype = mode.param_dtype
    torch.manual_seed(seed)
    model = digits_cnn().to(dtype)
    optim = build(method, model, dtype)
    X, y = data.X_train.to(dtype), data.y_train
    loss = torch.tensor(float("nan"))
    for epoch in range(epochs):
        for batch in epoch_batches(len(X), batch_size, seed, epoch):
            loss = train_step(model, optim, X[batch], y[batch], mode)
    _, accuracy = evaluate(model, data.X_test.to(dtype), data.y_test, mode)
    tensors = [*model.parameters(), *tensors_in(optim.state_dict())]
    finite = all(bool(torch.isfinite(t).all()) for t in tensors) and math.isfinite(float(loss))
    return Outcome(accuracy, float(loss), finite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    jobs = [(m, p, s) for m in args.methods for p in ("float32", "bfloat16") for s in args.seeds]
    results: dict[tuple[str, str], list[Outcome]] = {}
    for method, precision, seed in tqdm(jobs, desc="runs"):
        results.setdefault((method, precision), []).append(
            train(method, precision, seed, args.epochs)
        )

    lines = [
        f"Digits CNN, {args.epochs} epochs, batch 64, seeds {args.seeds}; "
        "mean (min–max) test accuracy.",
        "",
        "| method | float32 acc. % | bfloat16 acc. % | Δ (bf16 − fp32) | bf16 all finite |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for method in args.methods:
        fp32 = [100 * o.accuracy for o in results[(method, "float32")]]
        bf16 = [100 * o.accuracy for o in results[(method, "bfloat16")]]
        finite = all(o.finite for o in results[(method, "bfloat16")])

        def cell(values: list[float]) -> str:
            return f"{statistics.mean(values):.1f} ({min(values):.1f}–{max(values):.1f})"

        delta = statistics.mean(bf16) - statistics.mean(fp32)
        ok = "yes" if finite else "no"
        lines.append(f"| {method} | {cell(fp32)} | {cell(bf16)} | {delta:+.1f} | {ok} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
