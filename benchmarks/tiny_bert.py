"""Why a tiny BERT classifier did not learn with SINGD where AdamW did (issue 13).

A random-initialised ``BertForSequenceClassification`` (2 layers, hidden 32) learns a
synthetic 4-class task: the label is the most frequent of four marker tokens in a
sequence of 16 random tokens. Every optimizer gets the same data; the table lists the
mean training loss over the first and the last 10 of ``--steps`` steps, and the accuracy
on 512 held-out sequences.

Run:  python benchmarks/tiny_bert.py [--steps 100] [--seeds 0 1]
Needs the integration extra (transformers). CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import BertConfig, BertForSequenceClassification

from singd import SINGD

VOCAB, LENGTH, CLASSES, MARKERS = 64, 16, 4, (4, 5, 6, 7)


def task(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(8, VOCAB, (n, LENGTH), generator=gen)
    # plant markers: class c gets 3 copies of marker c, the others 0–2 copies each
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    for i in range(n):
        counts = torch.randint(0, 3, (CLASSES,), generator=gen)
        counts[labels[i]] = 3
        slots = torch.randperm(LENGTH - 1, generator=gen)[: int(counts.sum())] + 1
        ids[i, slots] = torch.repeat_interleave(torch.tensor(MARKERS), counts)
    ids[:, 0] = 1  # [CLS]
    return ids, labels


def model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
    )
    return BertForSequenceClassification(config)


OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw lr=1e-3": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "singd defaults (lr=1e-3)": lambda m: SINGD(m),
    "singd lr=1e-2": lambda m: SINGD(m, lr=1e-2),
    "singd lr=1e-3 lr_cov=0.1 T=1": lambda m: SINGD(m, lr_cov=0.1, T=1),
    "singd lr=1e-2 lr_cov=0.1 T=1": lambda m: SINGD(m, lr=1e-2, lr_cov=0.1, T=1),
    "singd lr=1e-2 lr_cov=0.1 T=1 damping=1e-2": lambda m: SINGD(
        m, lr=1e-2, lr_cov=0.1, T=1, damping=1e-2
    ),
    "singd lr=3e-2 lr_cov=0.1 T=1 damping=1e-2": lambda m: SINGD(
        m, lr=3e-2, lr_cov=0.1, T=1, damping=1e-2
    ),
    "sgd lr=0.1 momentum=0.9": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "singd lr=0.1 damping=0.1 lr_cov=0.1 T=1": lambda m: SINGD(
        m, lr=0.1, damping=0.1, lr_cov=0.1, T=1
    ),
    "singd lr=0.03 damping=0.1 lr_cov=0.1 T=1": lambda m: SINGD(
        m, lr=0.03, damping=0.1, lr_cov=0.1, T=1
    ),
    "singd lr=0.1 damping=0.1 lr_cov=0.3 T=1 normalized": lambda m: SINGD(
        m, lr=0.1, damping=0.1, lr_cov=0.3, T=1, normalize_lr_cov=True
    ),
    "singd lr=0.03 damping=0.01 lr_cov=0.3 T=1 normalized": lambda m: SINGD(
        m, lr=0.03, damping=0.01, lr_cov=0.3, T=1, normalize_lr_cov=True
    ),
}


def run(name: str, seed: int, steps: int, batch: int) -> tuple[float, float, float]:
    net = model(seed)
    optim = OPTIMIZERS[name](net)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids, labels = task(batch, gen)
        optim.zero_grad()
        loss = net(input_ids=ids, labels=labels).loss
        loss.backward()
        optim.step()
        losses.append(loss.item())
    ids, labels = task(512, torch.Generator().manual_seed(10_000 + seed))
    net.eval()
    with torch.no_grad():
        accuracy = (net(input_ids=ids).logits.argmax(1) == labels).float().mean().item()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    return first, last, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", help="optimizer names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"tiny BERT, {args.steps} steps, batch {args.batch}, seeds {args.seeds}")
    print("| optimizer | loss, first 10 steps | loss, last 10 steps | held-out acc. | s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.only or OPTIMIZERS:
        start = time.perf_counter()
        results = [run(name, seed, args.steps, args.batch) for seed in args.seeds]
        mean = [sum(r[i] for r in results) / len(results) for i in range(3)]
        seconds = time.perf_counter() - start
        print(f"| {name} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
