"""The optimizers' ``distributed`` argument, and the model wrappers they accept."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from singd.distributed.base import Distributor, Local, is_dtensor, is_fully_sharded
from singd.distributed.fsdp2 import FSDP2
from singd.distributed.replicated import Replicated
from singd.distributed.sharded import Sharded

#: The strategies named by a string (the optimizers' ``distributed`` argument).
STRATEGIES: dict[str, type[Distributor]] = {
    "replicated": Replicated,
    "sharded": Sharded,
    "fsdp2": FSDP2,
}
#: Values of ``distributed`` besides a :class:`~singd.distributed.Distributor` instance.
DISTRIBUTED_MODES = ("auto", *STRATEGIES, None)


def _fsdp1_type() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover (torch without FSDP)
        return None
    return FullyShardedDataParallel


def unwrap_model(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model whose layers get hooks, and its ``DistributedDataParallel`` wrapper.

    A ``fully_shard`` (FSDP2) model is its own model: the hooks go on its modules.

    Raises:
        TypeError: For ``nn.DataParallel`` (one process driving several GPUs: its
            per-GPU replicas are rebuilt at every forward), for the old
            ``FullyShardedDataParallel`` wrapper (its flat parameters have no per-layer
            weight; use ``fully_shard``) and for a DDP wrapper nested inside another
            module (pass the wrapper itself).
    """
    if isinstance(model, nn.DataParallel):
        raise TypeError(
            "nn.DataParallel is not supported: it rebuilds per-GPU replicas of the model at "
            "every forward, outside the optimizer's hooks. Launch one process per GPU with "
            "torchrun and wrap the model in torch.nn.parallel.DistributedDataParallel "
            "(see docs/distributed.md)."
        )
    fsdp1 = _fsdp1_type()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise TypeError(
            "The FullyShardedDataParallel wrapper (FSDP1) is not supported: it flattens the "
            "parameters of each wrapped module into one FlatParameter, so a layer has no weight "
            "of its own. Shard the model with FSDP2 instead, "
            "torch.distributed.fsdp.fully_shard (per layer and at the root), which SINGD and "
            "KFAC support (docs/distributed.md), or use DistributedDataParallel."
        )
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(model, ddp):
        return model.module, model
    if any(isinstance(m, ddp) for m in model.modules()):
        raise TypeError(
            "The model contains a DistributedDataParallel wrapper below its top level "
            "(e.g. torch.compile(ddp_model)): pass the DDP-wrapped model itself."
        )
    return model, None


def resolve_distributor(
    spec: Any, wrapper: nn.Module | None, model: nn.Module | None = None
) -> Distributor:
    """Turn the optimizers' ``distributed`` argument into a :class:`Distributor`.

    * ``"auto"`` (default): :class:`~singd.distributed.FSDP2` if ``model`` is
      ``fully_shard``-ed; :class:`~singd.distributed.Replicated` if the model is
      DDP-wrapped or ``torch.distributed`` is initialised with more than one rank;
      else :class:`Local`;
    * ``"replicated"`` / ``"sharded"`` / ``"fsdp2"``: those strategies
      (``torch.distributed`` must be initialised; ``"fsdp2"`` exactly for
      ``fully_shard`` models);
    * ``None``: :class:`Local`, no communication even if initialised;
    * a :class:`Distributor` instance, e.g. ``Sharded(process_group=pg)``.

    Raises:
        TypeError: For DTensor parameters without ``fully_shard`` (tensor parallelism).
        ValueError: For other values, for a strategy without an initialised process
            group, for a ``fully_shard`` model with another strategy (and ``"fsdp2"``
            without one), and for ``None`` with a DDP-wrapped model on several ranks (the
            ranks' Kronecker factors would drift apart).
    """
    sharded_model = model is not None and is_fully_sharded(model)
    if model is not None and not sharded_model and any(map(is_dtensor, model.parameters())):
        raise TypeError(
            "The model has DTensor parameters but no fully_shard module: tensor-parallel "
            "layouts are not supported. Shard the model with "
            "torch.distributed.fsdp.fully_shard (FSDP2, or HSDP on a 2-D mesh), or train it "
            "replicated with DistributedDataParallel or distributed='sharded'."
        )
    if isinstance(spec, Distributor):
        if sharded_model and not isinstance(spec, FSDP2):
            raise ValueError(
                f"The model is sharded with fully_shard; {type(spec).__name__} cannot train it. "
                "Use distributed='auto' or 'fsdp2' (singd.distributed.FSDP2)."
            )
        return spec
    initialised = dist.is_available() and dist.is_initialized()
    several = initialised and dist.get_world_size() > 1
    if sharded_model and spec not in ("auto", "fsdp2"):
        raise ValueError(
            f"The model is sharded with fully_shard (FSDP2); distributed={spec!r} cannot train "
            "it (its parameters are DTensor shards). Use distributed='auto' or 'fsdp2'."
        )
    if spec is None:
        if wrapper is not None and several:
            raise ValueError(
                "distributed=None with a DistributedDataParallel model on several ranks would "
                "let the ranks' Kronecker factors drift apart; use 'auto', 'replicated' or "
                "'sharded'."
            )
        return Local()
    if spec == "auto":
        if sharded_model:
            return FSDP2()
        return Replicated() if wrapper is not None or several else Local()
    if spec in STRATEGIES:
        if not initialised:
            raise ValueError(
                f"distributed={spec!r} needs torch.distributed: call "
                "torch.distributed.init_process_group() before creating the optimizer."
            )
        if spec == "fsdp2" and not sharded_model:
            raise ValueError(
                "distributed='fsdp2' is for models sharded with "
                "torch.distributed.fsdp.fully_shard; this model has no fully_shard module. "
                "Use 'replicated' or 'sharded' for a replicated model."
            )
        return STRATEGIES[spec]()
    raise ValueError(
        f"Invalid distributed {spec!r}. Valid: 'auto', 'replicated', 'sharded', 'fsdp2', None, "
        "or a singd.distributed.Distributor instance."
    )
