"""Replicated vs sharded data parallelism: step time and per-rank optimizer memory.

Run::

    python benchmarks/distributed.py                  # 2 ranks on this machine, Markdown out
    python benchmarks/distributed.py --quick          # fewer steps, T = 1 only
    python benchmarks/distributed.py --out benchmarks/distributed.md

The script spawns the ranks itself (gloo on CPU, nccl when every rank has a GPU) and
trains on random data, the model wrapped in ``DistributedDataParallel``:

* ``mlp``: MLP 1024-1024-1024-1024-10 on vectors, global batch 128 (64 rows per rank
  and layer, far fewer than the factor dimension 1025), with INGD (dense SINGD), KFAC,
  SINGD-diagonal and SINGD-block-diagonal(32);
* ``tokens``: a token-wise MLP 512-512-512-512-10 on ``[batch, 128, 512]`` sequences,
  global batch 32 (2048 rows per rank and layer under KFAC-expand, more than the
  factor dimension 513), per-token loss, with INGD and KFAC.

* ``transformer``: a small transformer (embedding 256 → 4 pre-norm blocks of width 128
  with attention and a GELU MLP → head), global batch 16 × 32 tokens, with INGD, KFAC and
  SINGD-diagonal; run it on 1, 2 and 4 ranks with ``--ranks 1 2 4``.

Strategies: ``replicated``; ``replicated, per tensor`` (one blocking all-reduce per
statistic tensor, as the published code: ``Replicated(bucket_mb=0, overlap=False)``);
``sharded``; for the transformer also ``fsdp2``: the model wrapped with ``fully_shard``
per block and at the root instead of DDP (:class:`singd.distributed.FSDP2`).

Method. Every rank uses ``cores // ranks`` threads. For each scenario, optimizer and
T, the strategies take turns step by step — 3 warm-up rounds, then ``--steps`` timed
rounds — so load from other processes on the machine hits all of them alike. A step
ends when the slowest rank is done (a barrier); the report gives the median over the
rounds. ``T = 1`` (a factor refresh every step: the worst case) and ``T = 10``.

Memory per rank, measured on every rank (max over ranks): *factors* = the optimizer's
preconditioner state (K, C, m_K, m_C; KFAC's S and P); *statistics* = the curvature
statistics held from backward to ``step()`` (transient; dense U, G in the sharded
mode); *other* = momentum buffers and fallback state (replicated, except under ``fsdp2``, where
they are DTensor shards: their local bytes count).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from singd import KFAC, SINGD
from singd.distributed import FSDP2, Local, Replicated, Sharded

OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "INGD (dense)": (SINGD, {"structures": ("dense", "dense")}),
    "KFAC (dense)": (KFAC, {"damping": 1e-2}),
    "SINGD-diagonal": (SINGD, {"structures": ("diagonal", "diagonal")}),
    "SINGD-block-diagonal(32)": (
        SINGD,
        {"structures": ("block_diagonal(32)", "block_diagonal(32)")},
    ),
}
STRATEGIES: dict[str, Callable[[], Any]] = {
    "replicated": lambda: Replicated(),
    "replicated, per tensor": lambda: Replicated(bucket_mb=0, overlap=False),
    "sharded": lambda: Sharded(),
    "fsdp2": lambda: FSDP2(),
}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads=4, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    def __init__(self, width: int, vocab: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(tokens))))


def mlp(width: int, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


@dataclasses.dataclass(frozen=True)
class Scenario:
    title: str
    width: int
    global_batch: int
    sequence: int | None  # None: vectors
    optimizers: tuple[str, ...]
    strategies: tuple[str, ...] = ("replicated", "replicated, per tensor", "sharded")
    model: str = "mlp"

    def loss_average(self) -> str:
        return "batch" if self.sequence is None else "batch+sequence"

    def build(self) -> nn.Module:
        return Transformer(self.width) if self.model == "transformer" else mlp(self.width)

    def data(self, batch: int, rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(rank)
        if self.model == "transformer":
            assert self.sequence is not None
            tokens = torch.randint(0, 256, (batch, self.sequence + 1), generator=gen)
            return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        shape = (batch,) if self.sequence is None else (batch, self.sequence)
        X = torch.randn(*shape, self.width, generator=gen)
        return X.to(device), torch.randint(0, 10, shape, generator=gen).to(device)


SCENARIOS = {
    "mlp": Scenario(
        "MLP 1024-1024-1024-1024-10, global batch 128", 1024, 128, None, (*OPTIMIZERS,)
    ),
    "tokens": Scenario(
        "token-wise MLP 512-512-512-512-10, global batch 32 × 128 tokens",
        512,
        32,
        128,
        ("INGD (dense)", "KFAC (dense)"),
    ),
    "transformer": Scenario(
        "transformer (embedding 256, 4 blocks of width 128), global batch 16 × 32 tokens",
        128,
        16,
        32,
        ("INGD (dense)", "KFAC (dense)", "SINGD-diagonal"),
        ("replicated", "sharded", "fsdp2"),
        "transformer",
    ),
}


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by this rank (a DTensor's local shard only)."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local if isinstance(t, Tensor))


def factor_bytes(optim: Any) -> int:
    """Bytes of the preconditioner state this rank holds (every layer's)."""
    return sum(tensor_bytes(pre.state_dict().values()) for pre in optim.preconditioners.values())


def statistics_bytes(optim: Any) -> int:
    return tensor_bytes(
        t
        for pre in optim.preconditioners.values()
        if pre.has_statistics()
        for side in pre.statistics()
        for t in side
    )


@dataclasses.dataclass
class Setup:
    """One model, optimizer and local batch being timed."""

    model: nn.Module
    optim: Any
    X: Tensor
    y: Tensor
    times: list[float] = dataclasses.field(default_factory=list)
    statistics: int = 0

    def step(self) -> None:
        self.optim.zero_grad()
        logits = self.model(self.X)
        nn.functional.cross_entropy(logits.flatten(0, -2), self.y.flatten()).backward()
        self.statistics = max(self.statistics, statistics_bytes(self.optim))
        self.optim.step()


def make_setup(
    scenario: Scenario, name: str, T: int, distributed: Any, batch: int, rank: int, device: Any
) -> Setup:
    cls, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    net = scenario.build().to(device)
    if isinstance(distributed, FSDP2):
        from torch.distributed.fsdp import fully_shard

        for block in getattr(net, "blocks", []):
            fully_shard(block)
        model = fully_shard(net)
    elif distributed is not None:
        model = nn.parallel.DistributedDataParallel(net)
    else:
        model = net
    optim = cls(
        model,
        lr=1e-3,
        T=T,
        loss_average=scenario.loss_average(),
        distributed=distributed or Local(),
        **kwargs,
    )
    return Setup(model, optim, *scenario.data(batch, rank, device))


def run_config(
    rank: int, world: int, device: torch.device, scenario: Scenario, name: str, T: int, steps: int
) -> list[tuple[str, dict[str, float]]]:
    """Time every strategy round-robin, step by step."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    local = scenario.global_batch // world
    order = list(scenario.strategies)
    setups = {s: make_setup(scenario, name, T, STRATEGIES[s](), local, rank, device) for s in order}
    for round_ in range(3 + steps):
        for strategy in order:
            sync()
            start = time.perf_counter()
            if strategy in setups:
                setups[strategy].step()
            sync()
            if round_ >= 3 and strategy in setups:
                setups[strategy].times.append(time.perf_counter() - start)
    results = []
    for strategy in order:
        setup = setups.get(strategy)
        mine = torch.zeros(3, dtype=torch.float64)
        if setup is not None:
            other = tensor_bytes(t for st in setup.optim.state.values() for t in st.values())
            mine = torch.tensor(
                [factor_bytes(setup.optim), setup.statistics, other], dtype=torch.float64
            )
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        if setup is not None and rank == 0:
            ms = 1000 * statistics.median(setup.times)
            keys = ("factors", "statistics", "other")
            results.append((strategy, {"ms": ms, **dict(zip(keys, mine.tolist(), strict=True))}))
    return results


def worker(rank: int, world: int, init: str, out: str, steps: int, configs: list) -> None:
    warnings.simplefilter("ignore")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(init_method=init, rank=rank, world_size=world)
    rows = []
    for key, name, T in configs:
        for strategy, result in run_config(rank, world, device, SCENARIOS[key], name, T, steps):
            rows.append((key, name, strategy, T, result))
            print(
                f"  {key:6s} {name:26s} {strategy:24s} T={T:<3d} {result['ms']:8.1f} ms", flush=True
            )
        gc.collect()
    if rank == 0:
        torch.save(rows, Path(out) / "rows.pt")
    # Free the DDP reducers (kept alive by the model↔optimizer hook cycle) while the
    # process group exists, and let every rank finish before tearing it down.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="e.g. 1 2 4")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--quick", action="store_true", help="4 steps, T = 1 only")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps
    T_values = (1,) if args.quick else (1, 10)
    configs = [
        (key, name, T)
        for key in args.scenarios
        for T in T_values
        for name in SCENARIOS[key].optimizers
    ]
    load_before = os.getloadavg()[:1]  # other processes on the machine skew the times
    rows = []
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as out:
            init = f"tcp://127.0.0.1:{free_port()}"
            mp.spawn(worker, args=(ranks, init, out, steps, configs), nprocs=ranks)
            rows += [(ranks, *row) for row in torch.load(Path(out) / "rows.pt")]

    device = "CUDA" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    machine = platform.processor() or platform.machine()
    load = " / ".join(f"{x:.1f}" for x in (*load_before, *os.getloadavg()[:1]))
    lines = [
        f"{'/'.join(map(str, args.ranks))} ranks on {device} ({machine}), torch "
        f"{torch.__version__}, DDP wrapper (fsdp2: fully_shard), median of {steps} "
        "interleaved steps; memory per rank in MiB (max over ranks); "
        f"load average (1 min) before / after: {load}.",
    ]
    for key in args.scenarios:
        lines += [
            "",
            f"**{SCENARIOS[key].title}**",
            "",
            "| ranks | optimizer | strategy | T | step (ms) | factors | statistics | other |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for ranks, scenario, name, strategy, T, r in rows:
            if scenario == key:
                lines.append(
                    f"| {ranks} | {name} | {strategy} | {T} | {r['ms']:.0f} | "
                    f"{mib(r['factors'])} | {mib(r['statistics'])} | {mib(r['other'])} |"
                )
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
