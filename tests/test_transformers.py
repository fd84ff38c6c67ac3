"""Hugging Face transformers: GPT-2's Conv1D layers and the Trainer (tiny random models, CPU).

Needs the ``test`` extra's ``transformers`` and ``accelerate`` (skipped without them).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from singd import SINGD  # noqa: E402
from tests.tolerances import TRAJECTORY_FLOAT32, tolerance  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: random init only


def with_statistics(optim: SINGD) -> set[str]:
    """The layers holding captured curvature statistics (not yet used by a step)."""
    return {name for name, pre in optim._preconditioners.items() if pre.has_statistics()}


HYPER = {"lr": 0.1, "lr_cov": 0.1, "alpha1": 0.3, "T": 1, "weight_decay": 1e-2}


def twin_conv1d_linear() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    conv = Conv1D(5, 4).double()  # (Conv1D always has a bias)
    linear = nn.Linear(4, 5).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return conv, linear


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv1d_follows_the_equivalent_linear(approx: str) -> None:
    """Conv1D stores Wᵀ: same statistics, same factors, same trajectory as nn.Linear."""
    conv, linear = twin_conv1d_linear()
    optims = [SINGD(m, kfac_approx=approx, **HYPER) for m in (conv, linear)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
        target = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
        for module, optim in zip((conv, linear), optims, strict=True):
            optim.zero_grad()
            # relu_ on the (view) output: the in-place case of GPT-2-style blocks
            nn.functional.mse_loss(module(x).relu_(), target).backward()
            optim.step()
    assert set(optims[0].layers) == {""}, "Conv1D must get Kronecker factors"
    torch.testing.assert_close(conv.weight.T, linear.weight, **tolerance(torch.float64))
    torch.testing.assert_close(conv.bias, linear.bias, **tolerance(torch.float64))
    for factor in ("K", "C"):
        a, b = (getattr(o.factors(""), factor).to_dense() for o in optims)
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=32,
        n_positions=8,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def test_gpt2_gets_kronecker_factors_for_its_conv1d_layers() -> None:
    model = tiny_gpt2()
    optim = SINGD(model)
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(conv1d) == 8 and conv1d <= set(optim.layers)
    assert "transformer.wpe" in optim.layers
    # The tied input/output embedding is one parameter used by two layers: fallback,
    # with the reason in the report.
    wte = model.transformer.wte.weight
    assert wte is model.lm_head.weight and wte in optim._registry.fallback_group
    assert "shared by layers 'transformer.wte', 'lm_head'" in optim.describe()
    kronecker = sum(p.numel() for p in optim._registry.layer_of_param)
    assert kronecker > 0.5 * sum(p.numel() for p in model.parameters())


class TokenData(torch.utils.data.Dataset):
    """Eight fixed sequences, repeated: a language model can learn them."""

    def __init__(self, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (8, 8), generator=gen).repeat(n // 8, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_gpt2(
    out: Path,
    *,
    max_steps: int,
    batch: int = 4,
    accumulation: int = 2,
    resume: str | None = None,
    save_steps: int | None = None,
) -> tuple[GPT2LMHeadModel, Trainer]:
    model = tiny_gpt2()
    optim = SINGD(model, lr=2e-2, lr_cov=1e-2, damping=1e-3, T=2, weight_decay=0.0)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.5,  # the Trainer clips (and logs the norm) every step
        max_steps=max_steps,
        learning_rate=2e-2,  # the Trainer's linear schedule drives SINGD's lr
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(optim, None))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="singd")  # no fallback demotion, no scale warning
        trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_trainer_trains_gpt2_and_resumes_exactly(tmp_path: Path) -> None:
    """Gradient accumulation 2, clipping at 0.5, a checkpoint at step 3 of 6."""
    full, trainer = train_gpt2(tmp_path / "full", max_steps=6, save_steps=3)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    optim = trainer.optimizer.optimizer  # the Trainer wraps it in accelerate's optimizer
    assert isinstance(optim, SINGD) and optim.steps == 6
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    resumed, _ = train_gpt2(tmp_path / "resumed", max_steps=6, resume=str(checkpoint))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_accelerate_scaler_pattern_equals_the_unscaled_run() -> None:
    """HF Trainer(fp16=True) on a GPU: accelerate makes the GradScaler after the optimizer,
    wraps it in AcceleratedOptimizer, unscale_s it to clip, then steps through the scaler.

    accelerate turns fp16 off on a CPU, so the same objects are driven by hand here with
    a CPU GradScaler (no autocast: the scale must cancel exactly).
    """
    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads (as the Trainer makes it)
    plain, scaled = tiny_gpt2(), tiny_gpt2()
    data = TokenData()
    optim_plain = SINGD(plain, lr=2e-2, T=1)
    inner = SINGD(scaled, lr=2e-2, T=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    optim_scaled = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    scales = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="singd")
        for step in range(6):
            batch = data.ids[4 * step : 4 * step + 4]
            for model, optim in ((plain, optim_plain), (scaled, optim_scaled)):
                optim.zero_grad()
                loss = model(input_ids=batch, labels=batch).loss
                if model is scaled:
                    scaler.scale(loss).backward()
                    scales.append(scaler.get_scale())
                    scaler.unscale_(inner)  # accelerator.clip_grad_norm_ → unscale_gradients
                else:
                    loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                optim.step()  # AcceleratedOptimizer.step: scaler.step(inner); scaler.update()
    assert len(set(scales)) > 1 and inner.steps == 6
    rtol, atol = TRAJECTORY_FLOAT32
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def test_gpt2_copy_for_ema_carries_no_hooks() -> None:
    model = tiny_gpt2()
    optim = SINGD(model, T=1)
    ema = copy.deepcopy(model)
    ids = TokenData().ids[:2]
    ema(input_ids=ids, labels=ids).loss.backward()
    assert not with_statistics(optim)


def test_gpt2_blocks_are_stacked_and_equal_one_layer_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The blocks' equal Conv1D layers (weights stored transposed) are refreshed and
    preconditioned as stacks (:mod:`singd.preconditioners.stacked`, the adapter's
    ``stacked_grad_matrices``), equal to one layer at a time in float64."""
    from singd.preconditioners import SINGDPreconditioner
    from singd.preconditioners.stacked import StackedBatch

    def run(batched: bool) -> tuple[GPT2LMHeadModel, SINGD]:
        with monkeypatch.context() as patch:
            if not batched:
                patch.setattr(SINGDPreconditioner, "batch_key", lambda self: None)
            model = tiny_gpt2().double()
            optim = SINGD(model, structures=("dense", "block_diagonal(4)"), **HYPER)
            gen = torch.Generator().manual_seed(0)
            for _ in range(3):
                ids = torch.randint(32, (4, 8), generator=gen)
                optim.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                optim.step()
        return model, optim

    model, optim = run(batched=True)
    stacks = {
        tuple(pre.name for pre in batch.pres)
        for pre in optim._preconditioners.values()
        for batch in getattr(pre, "batches", {}).values()
        if isinstance(batch, StackedBatch)
    }
    blocks = [f"transformer.h.{i}" for i in range(2)]
    for projection in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert tuple(f"{b}.{projection}" for b in blocks) in stacks
    reference, _ = run(batched=False)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance(torch.float64), msg=name)
