"""Train a tiny GPT-2 with the Hugging Face ``Trainer`` and SINGD (random init, no download).

Run:  python examples/hf_trainer_gpt2.py [--steps 60] [--fp16] [--resume]
Needs: pip install -e ".[integration]"

The Trainer takes a ready optimizer through ``optimizers=(optimizer, scheduler)``; with
``None`` as scheduler it builds its linear schedule around SINGD's ``lr``. GPT-2's
attention and MLP projections are ``transformers``' ``Conv1D`` layers, which SINGD
preconditions like ``nn.Linear``; the tied ``wte``/``lm_head`` embedding and the LayerNorms
are trained by the AdamW fallback inside the same optimizer (``print(optimizer)``).
``--fp16`` needs a GPU (accelerate turns fp16 off on a CPU); SINGD then learns the
GradScaler's scale from the Trainer's ``unscale_`` call, with no extra argument.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from singd import SINGD


class Sequences(torch.utils.data.Dataset):
    """64 random sequences of 32 tokens, repeated: a language model can memorise them."""

    def __init__(self, vocab: int, length: int = 32, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (64, length), generator=gen).repeat(n // 64, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fp16", action="store_true", help="mixed precision (GPU only)")
    parser.add_argument("--resume", action="store_true", help="stop halfway, then resume")
    parser.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="singd-gpt2-")

    def train(resume: str | None, max_steps: int) -> Trainer:
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=128,
            n_positions=32,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
        # Hyper-parameters that trained this model (docs/integrations.md): factors
        # refreshed every 2 steps with a large lr_cov so they adapt within the run.
        optimizer = SINGD(model, lr=2e-2, lr_cov=1e-2, damping=1e-3, T=2)
        if resume is None:
            print(optimizer)
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            max_steps=max_steps,
            learning_rate=2e-2,  # the Trainer's schedule sets SINGD's lr
            logging_steps=10,
            save_strategy="steps",
            save_steps=max(1, args.steps // 2),
            report_to=[],
            fp16=args.fp16,
            use_cpu=not torch.cuda.is_available(),
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=Sequences(128),
            optimizers=(optimizer, None),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    trainer = train(None, args.steps)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"loss: first log {losses[0]:.3f}, last {losses[-1]:.3f}")
    if args.resume:
        checkpoint = os.path.join(out, f"checkpoint-{max(1, args.steps // 2)}")
        resumed = train(checkpoint, args.steps)
        same = all(
            torch.equal(p, q)
            for p, q in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True)
        )
        print(f"resumed from {checkpoint}: parameters equal to the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
