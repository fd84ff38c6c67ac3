"""Train a small transformer sharded with FSDP2 (``fully_shard``) and SINGD; checkpoint with DCP.

Run on CPU (gloo) or GPUs (nccl)::

    torchrun --nproc_per_node=2 examples/fsdp2_train.py
    torchrun --nproc_per_node=4 examples/fsdp2_train.py --bf16 --checkpoint ckpt/

Every block and the root are wrapped with ``fully_shard``; the optimizer finds the
sharded layers itself (``distributed="auto"`` picks the FSDP2 strategy): each rank owns
the Kronecker factors of a subset of the layers. With ``--checkpoint`` the run saves a
DCP checkpoint halfway, a fresh model and optimizer load it, and the rest of the run
continues from there.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from singd import SINGD
from singd.distributed.checkpoint import load_optimizer, optimizer_state_dict

VOCAB, DIM, SEQ = 64, 32, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, num_heads=4, batch_first=True)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class LanguageModel(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def build(device: torch.device, bf16: bool) -> tuple[nn.Module, SINGD]:
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = LanguageModel().to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    options = {"mp_policy": policy} if bf16 else {}
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    with warnings.catch_warnings():
        # attention's out_proj weight is used without calling the Linear: it moves to the
        # fallback (AdamW) at the first step, with a warning
        warnings.simplefilter("ignore")
        optim = SINGD(model, lr=3e-3, T=5, structures=("dense", "dense"))
    return model, optim


def batches(rank: int, world: int, steps: int, device: torch.device):
    """Each rank's part of a global batch of 8 · world sequences (a toy copying task)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (8 * world, SEQ), generator=gen)
        yield tokens[rank * 8 : (rank + 1) * 8].to(device)


def train(model: nn.Module, optim: SINGD, data) -> float:
    loss = torch.zeros(())
    for tokens in data:
        optim.zero_grad()
        logits = model(tokens)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
        )
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the out_proj move, once
            optim.step()
    return loss.item()


def main() -> None:
    # torch's notice that F.linear on a 3-D input returns a view (the model does no in-place op)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(bfloat16)")
    parser.add_argument("--checkpoint", help="DCP checkpoint folder (save halfway, reload)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1")
    )
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, optim = build(device, args.bf16)
    data = batches(rank, world, args.steps, device)
    half = args.steps // 2 if args.checkpoint else args.steps
    loss = train(model, optim, (next(data) for _ in range(half)))
    if args.checkpoint:
        state = {"model": get_model_state_dict(model), "optim": optimizer_state_dict(optim)}
        dcp.save(state, checkpoint_id=args.checkpoint)
        model, optim = build(device, args.bf16)  # as a restarted job would
        model_state = get_model_state_dict(model)
        dcp.load({"model": model_state}, checkpoint_id=args.checkpoint)
        set_model_state_dict(model, model_state)
        load_optimizer(optim, args.checkpoint)
        if rank == 0:
            print(f"checkpoint saved and loaded at step {optim.steps}")
        loss = train(model, optim, data)
    owned = len([name for name in optim.layers if optim.distributor.owns(name)])
    # one write per line, flushed at once, so the ranks' lines do not split each other
    print(f"rank {rank}: owns the factors of {owned} of {len(optim.layers)} layers", flush=True)
    if rank == 0:
        print(f"final loss {loss:.4f} after {optim.steps} steps on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
