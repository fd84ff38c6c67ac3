"""PyTorch Lightning: SINGD from configure_optimizers (tiny model, CPU).

Lightning's automatic optimization calls ``optimizer.step(closure)``; its mixed precision
plugins unscale through a GradScaler and clip. Needs the ``test`` extra's ``lightning``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from singd import SINGD  # noqa: E402
from tests.tolerances import tolerance  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(inplace=True), nn.Linear(16, 3)
        )
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        X, y = batch
        loss = nn.functional.cross_entropy(self.net(X), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> SINGD:
        return SINGD(self.net, lr=5e-2, lr_cov=5e-2, damping=1e-2, T=2)


def loader() -> torch.utils.data.DataLoader:
    """Three batches per epoch, in a fixed order (a resumed epoch starts where it did)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 8, generator=gen)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)


def fit(
    root: Path,
    max_steps: int,
    *,
    ckpt_path: str | None = None,
    start: int = 0,
    save_every: int | None = None,
    **trainer_kwargs,
) -> Classifier:
    model = Classifier()
    callbacks = []
    if save_every:
        callbacks.append(
            ModelCheckpoint(dirpath=root, every_n_train_steps=save_every, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(save_every),
        callbacks=callbacks,
        default_root_dir=root,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="singd")
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
    optim = trainer.optimizers[0]
    assert isinstance(optim, SINGD) and optim.steps == max_steps
    assert len(model.losses) == max_steps - start  # one closure call per step()
    return model


def test_bf16_mixed_with_clipping_trains_and_resumes_exactly(tmp_path: Path) -> None:
    kwargs = {"precision": "bf16-mixed", "gradient_clip_val": 0.5}
    full = fit(tmp_path / "full", 9, save_every=3, **kwargs)
    assert full.losses[-1] < full.losses[0]
    checkpoint = tmp_path / "full" / "epoch=0-step=3.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in (tmp_path / "full").iterdir())
    resumed = fit(tmp_path / "resumed", 9, ckpt_path=str(checkpoint), start=3, **kwargs)
    assert resumed.losses == full.losses[3:]
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_16_mixed_grad_scaler_with_clipping_follows_the_float32_run(tmp_path: Path) -> None:
    """Lightning's MixedPrecision makes the GradScaler after the optimizer, unscale_s it,
    clips, then steps through the scaler. (Trainer(precision="16-mixed") is GPU-only, so
    the plugin is given a CPU scaler here.)"""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    mixed = fit(tmp_path / "mixed", 6, plugins=[plugin], gradient_clip_val=0.5)
    plain = fit(tmp_path / "plain", 6, gradient_clip_val=0.5)
    assert scaler.get_scale() != 2.0**10  # the scale really changed
    for (name, p), q in zip(plain.named_parameters(), mixed.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance(torch.float16), msg=name)
