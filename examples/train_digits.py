"""Train a small CNN on scikit-learn's bundled handwritten digits with SINGD.

Run:  python examples/train_digits.py  [--structure diagonal] [--epochs 8]

The digits (1797 images of 8×8 pixels, 10 classes) ship inside scikit-learn, so
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

from singd.cli.data import load_digits  # scikit-learn's digits as tensors, a fixed split
from singd.cli.models import digits_cnn  # Conv → ReLU → Conv → ReLU → Linear → ReLU → Linear
from singd.optim.optimizer import SINGD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="dense", help="structure of K and C (default dense)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_digits()
    X_train, X_test, y_train, y_test = data.X_train, data.X_test, data.y_train, data.y_test
    model = digits_cnn()
    loss_func = nn.CrossEntropyLoss()
    optim = SINGD(
        model,
        lr=3e-3,
        momentum=0.9,
        damping=0.1,
        lr_cov=0.1,
        T=5,
        structures=(args.structure, args.structure),
    )

    start = time.perf_counter()
    steps = 0
    bar = tqdm(range(args.epochs), desc="training", unit="epoch")
    for _ in bar:
        for batch in torch.randperm(len(X_train)).split(args.batch_size):
            optim.zero_grad()
            loss = loss_func(model(X_train[batch]), y_train[batch])
            loss.backward()
            optim.step()
            steps += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
        train_loss = loss_func(model(X_train), y_train).item()
    print(
        f"SINGD ({args.structure}): train loss {train_loss:.4f}, test accuracy "
        f"{100 * accuracy:.1f}%, {1000 * elapsed / steps:.1f} ms/step"
    )


if __name__ == "__main__":
    main()
