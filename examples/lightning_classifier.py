"""SINGD in a PyTorch Lightning module: scikit-learn's digits, bf16 mixed precision, clipping.

Run:  python examples/lightning_classifier.py [--epochs 3] [--precision bf16-mixed]
Needs: pip install -e ".[integration,examples]"

``configure_optimizers`` returns SINGD like any optimizer. Lightning's automatic
optimization calls ``optimizer.step(closure)``; ``gradient_clip_val`` clips the raw
gradient before the step, also under "16-mixed" (GPU), where Lightning unscales through
its GradScaler first and SINGD reads the scale from it. Resume with ``--ckpt PATH``.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from singd import SINGD


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.LayerNorm(64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        X, y = batch
        loss = nn.functional.cross_entropy(self.net(X), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        X, y = batch
        self.log("val_acc", (self.net(X).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> SINGD:
        # the hyper-parameters of examples/train_digits.py
        return SINGD(self.net, lr=self.lr, momentum=0.9, damping=0.1, lr_cov=1e-2, T=1)


def loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    data = load_digits()
    X = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    train, val = TensorDataset(X[:1500], y[:1500]), TensorDataset(X[1500:], y[1500:])
    return DataLoader(train, batch_size, shuffle=True), DataLoader(val, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val")
    parser.add_argument("--ckpt", default=None, help="resume from this checkpoint")
    parser.add_argument("--out", default=None, help="checkpoint folder (default: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        precision=args.precision,
        gradient_clip_val=args.clip,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=args.out or tempfile.mkdtemp(prefix="singd-lightning-"),
    )
    train, val = loaders()
    trainer.fit(DigitsClassifier(), train, val, ckpt_path=args.ckpt)
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})
    print(f"checkpoint: {trainer.checkpoint_callback.best_model_path}")


if __name__ == "__main__":
    main()
