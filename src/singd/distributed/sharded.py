r"""Sharded data parallelism: each rank owns the factors of a subset of the layers.

Ownership, for 2 ranks and layers ``a`` (cost 8), ``b`` (5), ``c`` (4), ``d`` (1)
(greedy: largest cost first, to the least-loaded rank, ties to the lower rank)::

    rank 0 │ a a a a a a a a │ d │            load 9
    rank 1 │ b b b b b │ c c c c │            load 9

One step on rank *r*:

1. gradients become global (all-reduced without the DDP wrapper, as in
   :class:`~singd.distributed.replicated.Replicated`);
2. at refresh steps, every rank's statistics of every due layer — *factor-free*
   statistics (:mod:`singd.functional.statistics`), since only owners hold K and C —
   are **reduce-scattered**: each owner receives the reduced statistics of its own
   layers (half the traffic of an all-reduce), every other copy is dropped;
3. the owner refreshes its layers' factors and preconditions their gradients;
4. one **all-gather** per dtype gives every rank every layer's natural gradient
   (bitwise the owner's result), and every rank applies the same parameter step
   (momentum and weight decay are replicated, like the parameters). Fallback
   parameters are updated on every rank from the global gradients.

Per rank, the factors (K, C and their momenta; KFAC's S and P) and their refresh
and preconditioning compute fall to about 1/R. The statistics are transiently held
in full on every rank until step 2 (dense :math:`U, G` except for diagonal
factors), and each step pays one all-gather of the natural gradients.

Choose it for large **dense** factors (INGD, KFAC, IKFAC with wide layers), where
the O(d³) refresh and preconditioning and the O(d²) factor memory dominate. For
structured factors the replicated mode is cheaper: its statistics are as small as the
factors, while this mode ships dense statistics and adds the all-gather. One SINGD-
specific cost: the owner forms :math:`\hat\Pi(K^\top \bar U K)` from the dense
:math:`\bar U` in 2d³, where a replicated rank needs 2d²·rows from its own rows — with
few rows per rank (vector inputs, small batches), INGD refreshing every step only
breaks even on 2 ranks (docs/distributed.md has the measurements).

Cost of a layer for the balance: :math:`\sum_{F \in \{K, C\}} n_F^{3/2}` with
:math:`n_F` the number of stored entries of the factor — :math:`d^3` for a dense
factor (its matrix products), less for structured ones.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from singd.distributed.base import statistics
from singd.distributed.collectives import (
    launch_all_gather,
    launch_all_reduce,
    launch_reduce_scatter,
)
from singd.distributed.protocol import DistributedOptimizer, KroneckerLayer
from singd.distributed.replicated import Replicated


def layer_cost(optimizer: DistributedOptimizer, layer: KroneckerLayer) -> float:
    """The balancing cost of a layer (module docstring)."""
    return sum(float(n) ** 1.5 for n in optimizer.factor_sizes(layer))


class Sharded(Replicated):
    """Each rank owns, refreshes and applies the factors of a cost-balanced layer subset.

    Same arguments as :class:`~singd.distributed.replicated.Replicated`
    (``bucket_mb`` applies to the gradient all-reduce).

    ``state_dict()`` is a **collective** in this mode: call it on every rank; each
    returns every layer's factors (gathered from their owners), so the checkpoint
    saved by rank 0 restores any number of ranks in any mode.
    """

    replicates_factors = False
    #: ``state_dict()`` gathers every layer's factors (False: this rank's layers only, as
    #: :func:`singd.distributed.checkpoint.optimizer_state_dict` saves them).
    gather_states = True

    def _set_group(self, group: dist.ProcessGroup | None) -> None:
        # (called by the constructor too) ownership is per group: a new one starts afresh
        super()._set_group(group)
        self._owner: dict[str, int] = {}
        self._load = [0.0] * self.world_size

    # --- ownership -----------------------------------------------------------------------
    def _assign(self) -> None:
        """Give every new layer an owner: largest cost first, to the least-loaded rank.

        Deterministic (same layers, costs and order on every rank), and stable: a layer
        keeps its owner when layers are added later (``add_param_group``).
        """
        optimizer = self._optimizer
        if optimizer is None:
            raise RuntimeError("The distributor is not attached to an optimizer.")
        new = [layer for name, layer in optimizer.layers.items() if name not in self._owner]
        costs = [layer_cost(optimizer, layer) for layer in new]
        for i in sorted(range(len(new)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.world_size), key=lambda r: (self._load[r], r))
            self._owner[new[i].name] = rank
            self._load[rank] += costs[i]

    def owner(self, layer_name: str) -> int:
        """The rank that holds ``layer_name``'s factors."""
        if layer_name not in self._owner:
            self._assign()
        return self._owner[layer_name]

    def owns(self, layer_name: str) -> bool:
        return self.owner(layer_name) == self.rank

    # --- hooks ---------------------------------------------------------------------------
    def synchronize(self, optimizer: DistributedOptimizer) -> None:
        """Global gradients everywhere; each due layer's statistics on its owner only."""
        grads, grad_average = self._gradients_to_reduce(optimizer)
        finish_gradients = launch_all_reduce(
            grads,
            grad_average,
            world_size=self.world_size,
            group=self.group,
            bucket_bytes=self.bucket_bytes,
            overlap=self.overlap,
        )
        layers = optimizer.due_layers()
        tensors, average, layer_index = statistics(optimizer, layers)
        owners = [self.owner(layers[i].name) for i in layer_index]
        finish_statistics = launch_reduce_scatter(
            tensors,
            average,
            owners,
            rank=self.rank,
            world_size=self.world_size,
            group=self.group,
            overlap=self.overlap,
        )
        finish_gradients()
        finish_statistics()
        for layer in layers:
            if not self.owns(layer.name):
                optimizer.drop_statistics(layer)

    def share_updates(
        self,
        optimizer: DistributedOptimizer,
        updates: dict[str, Tensor],
        grads: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """All-gather the owners' natural gradients (shaped, typed and placed like the
        gradient matrices, which every rank holds)."""
        names = list(grads)
        result, finish = launch_all_gather(
            [updates[name] for name in names if self.owns(name)],
            [grads[name].shape for name in names],
            [grads[name].dtype for name in names],
            [grads[name].device for name in names],
            [self.owner(name) for name in names],
            rank=self.rank,
            world_size=self.world_size,
            group=self.group,
            overlap=self.overlap,
        )
        finish()
        return {name: t for name, t in zip(names, result, strict=True) if t is not None}

    def gather_layer_states(
        self, optimizer: DistributedOptimizer, states: dict[str, dict[str, Tensor]]
    ) -> dict[str, dict[str, Tensor]]:
        """Every layer's checkpoint tensors, from their owners (a collective).

        Tensors travel as CPU tensors (``all_gather_object``) and are moved to the
        layer's device, so the result looks like the replicated mode's. With
        ``gather_states`` False: this rank's layers only (no communication).
        """
        if not self.gather_states:
            return {name: state for name, state in states.items() if self.owns(name)}
        mine = {
            name: {k: v.detach().cpu() for k, v in state.items()}
            for name, state in states.items()
            if self.owns(name)
        }
        parts: list[dict[str, dict[str, Tensor]] | None] = [None] * self.world_size
        dist.all_gather_object(parts, mine, group=self.group)
        merged = {name: dict(state) for name, state in states.items()}
        for rank, part in enumerate(parts):
            if rank == self.rank or part is None:
                continue
            for name, state in part.items():
                device = optimizer.layers[name].weight.device
                merged[name] = {k: v.to(device) for k, v in state.items()}
        return merged
