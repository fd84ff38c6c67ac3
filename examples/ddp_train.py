"""Data-parallel SINGD with torchrun: a CNN on scikit-learn's digits, one process per rank.

Run (CPU, gloo):   torchrun --nproc_per_node=2 examples/ddp_train.py
On GPUs (nccl):    torchrun --nproc_per_node=<gpus> examples/ddp_train.py
Options:           --mode sharded       each rank owns the factors of some layers
                   --no-wrapper         no DDP wrapper: the optimizer reduces the gradients
                   --checkpoint PATH    save rank 0's checkpoint, restore it on every rank

Each rank reads a disjoint shard of every batch (``DistributedSampler`` with
``drop_last=True``: equal local batches make the run equal to one process on the
concatenated batches). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from singd import SINGD
from singd.distributed import Replicated, Sharded


def digits() -> TensorDataset:
    data = load_digits()
    X = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return TensorDataset(X, torch.tensor(data.target))


def cnn() -> nn.Sequential:
    """Conv and Linear layers get Kronecker factors; the LayerNorm gets the AdamW fallback."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(32 * 4 * 4),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("replicated", "sharded"), default="replicated")
    parser.add_argument("--no-wrapper", action="store_true", help="do not wrap in DDP")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--checkpoint", default=None, help="save/restore through this file")
    args = parser.parse_args()

    # No backend named: torch picks gloo for CPU tensors and nccl for CUDA tensors.
    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local_ranks, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if local_ranks > gpus:
            raise SystemExit(
                f"{local_ranks} processes on this node but {gpus} GPU(s): one process per GPU "
                f"(--nproc_per_node={gpus}), or CUDA_VISIBLE_DEVICES= to train on the CPUs."
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    net = cnn().to(device)
    model = net if args.no_wrapper else nn.parallel.DistributedDataParallel(net)
    strategy = {"replicated": Replicated, "sharded": Sharded}[args.mode](check_every=50)
    optim = SINGD(model, lr=3e-3, momentum=0.9, damping=0.1, lr_cov=0.1, T=5, distributed=strategy)
    if rank == 0:
        print(f"{world} ranks, {args.mode} factors, DDP wrapper: {not args.no_wrapper}")
        print(optim.describe())

    dataset = digits()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(
        dataset, batch_size=args.batch_size // world, sampler=sampler, drop_last=True
    )
    loss_func = nn.CrossEntropyLoss()  # mean over the batch: loss_average="batch" (default)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)
        for X, y in loader:
            X, y = X.to(device), y.to(device)
            optim.zero_grad()
            loss = loss_func(model(X), y)
            loss.backward()
            optim.step()
            total += torch.stack([loss.detach() * len(y), torch.tensor(len(y), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: train loss {total[0].item() / total[1].item():.4f}")

    if args.checkpoint:
        state = optim.state_dict()  # every rank: a collective in the sharded mode
        if rank == 0:
            torch.save({"model": net.state_dict(), "optim": state}, args.checkpoint)
        dist.barrier()
        saved = torch.load(args.checkpoint, weights_only=True, map_location=device)
        net.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])  # each rank keeps what it needs
        if rank == 0:
            print(f"saved and restored {args.checkpoint} on every rank (step {optim.steps})")

    optim._distributor.check_parameters(optim)  # raises if any rank drifted
    with torch.no_grad():
        X, y = dataset.tensors
        accuracy = (net(X.to(device)).argmax(1) == y.to(device)).float().mean().item()
    if rank == 0:
        print(f"accuracy on all {len(y)} digits: {accuracy:.3f}; parameters identical on all ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
