"""Data-parallel training with ``torch.distributed`` (see ``docs/distributed.md``).

Pick a strategy with the optimizers' ``distributed`` argument:

* ``"auto"`` (default) — :class:`Replicated` when the model is wrapped in
  ``DistributedDataParallel`` or ``torch.distributed`` runs several ranks, else
  :class:`Local`;
* ``"replicated"`` — :class:`Replicated`: every rank holds every factor; statistics
  (and, without the DDP wrapper, gradients) are all-reduced in flat buckets;
* ``"sharded"`` — :class:`Sharded`: each rank owns the factors of a cost-balanced
  subset of layers; owners refresh and precondition, an all-gather shares the result;
* ``"fsdp2"`` — :class:`FSDP2`, for models sharded with ``fully_shard`` (chosen by
  ``"auto"`` for them): each rank owns the factors of a subset of layers, gathers
  their full gradients from the shards and sends the natural gradients back;
* ``None`` — :class:`Local`: no communication;
* a :class:`Distributor` instance, to set the process group, bucket size or the
  periodic cross-rank parameter check, e.g. ``Sharded(check_every=100)``.

The strategies see the optimizer only through :class:`DistributedOptimizer`
(:mod:`singd.distributed.protocol`); nothing here imports :mod:`singd.optim`.
"""

from singd.distributed.base import Distributor, Local
from singd.distributed.fsdp2 import FSDP2
from singd.distributed.protocol import DistributedOptimizer, KroneckerLayer
from singd.distributed.replicated import Replicated
from singd.distributed.resolve import DISTRIBUTED_MODES, resolve_distributor, unwrap_model
from singd.distributed.sharded import Sharded

__all__ = [
    "DISTRIBUTED_MODES",
    "FSDP2",
    "DistributedOptimizer",
    "Distributor",
    "KroneckerLayer",
    "Local",
    "Replicated",
    "Sharded",
    "resolve_distributor",
    "unwrap_model",
]
