r"""Distribution as a strategy: the :class:`Distributor` interface and the no-op :class:`Local`.

A Kronecker optimizer (:class:`~singd.optim.base.KroneckerOptimizer`) delegates
everything that involves other data-parallel ranks to one ``Distributor`` object,
chosen with its ``distributed`` argument. The optimizer calls it at a few fixed
points of ``step()`` and checkpointing; the update rules never see a rank.

============================  ==============================================================
hook                          called
============================  ==============================================================
:meth:`~Distributor.attach`        once, at the end of the optimizer's construction
:meth:`~Distributor.before_step`   first thing in ``step()`` (consistency checks)
:meth:`~Distributor.synchronize`   after the skip decision, before any update: make the
                                   gradients and the due layers' statistics global
:meth:`~Distributor.owns`          which layers this rank refreshes and preconditions
:meth:`~Distributor.share_updates` after preconditioning: every rank gets every layer's
                                   natural gradient
:meth:`~Distributor.gather_layer_states`  in ``state_dict()``: every layer's factors
============================  ==============================================================

Semantics (derived in ``docs/distributed.md``). With R ranks, equal local batches of
B/R samples, and a loss that averages as ``loss_average`` says, a step on R ranks
equals one process's step on the concatenated batch when

* :math:`U` (and :math:`H_K`) are **averaged** over ranks: each rank normalises its
  :math:`U_r` by its own rows, for every ``loss_average``;
* :math:`G` (and :math:`H_C`) are **averaged** for ``"batch"``/``"batch+sequence"``
  (each rank's loss is a mean over its own terms) and **summed** for ``None`` (a summed
  loss: the full-batch :math:`G` is the sum of the per-sample terms). The published
  code sums :math:`H_K` too for ``None``, which makes it R times too large;
* gradients are **averaged** (``"batch"``/``"batch+sequence"``) or **summed** (``None``).
  The DDP wrapper always averages, so for ``None`` the gradients are multiplied by R.

Because every rank then holds the same reduced statistics and gradients and runs the
same deterministic computation (or receives the one result its owner computed), the
ranks' parameters and factors stay identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from singd.distributed.protocol import DistributedOptimizer, KroneckerLayer


class Distributor:
    """How a Kronecker optimizer shares work among data-parallel ranks.

    The base class is the single-process behaviour (no communication); subclasses
    override the hooks they need. One distributor serves one optimizer.
    """

    #: Whether every rank holds every layer's factors (False: each rank owns a subset).
    replicates_factors: bool = True
    #: This rank and the number of ranks in the distributor's process group.
    rank: int = 0
    world_size: int = 1

    def attach(self, optimizer: DistributedOptimizer, wrapper: nn.Module | None) -> None:
        """Bind to ``optimizer`` (its layers and param groups are registered).

        Args:
            optimizer: The optimizer this distributor serves.
            wrapper: The ``DistributedDataParallel`` wrapper the optimizer was given
                (its gradients arrive averaged over ranks), or None.
        """

    def before_step(self, optimizer: DistributedOptimizer) -> None:
        """Checks at the start of ``step()`` (may raise)."""

    def before_unscale(self, optimizer: DistributedOptimizer) -> None:
        """Checks before a GradScaler reads and unscales the gradients (may raise)."""

    def reduce_gradients(self, optimizer: DistributedOptimizer) -> None:
        """Make the gradients global now (see ``synchronize_gradients``)."""

    def synchronize(self, optimizer: DistributedOptimizer) -> None:
        """Make the gradients and the due layers' statistics global (they are local)."""

    def owns(self, layer_name: str) -> bool:
        """Whether this rank refreshes and preconditions ``layer_name``."""
        return True

    def owned_gradients(
        self, optimizer: DistributedOptimizer, grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Gradient matrices of every layer with a gradient → the full ones of the layers
        this rank preconditions."""
        return {name: G for name, G in grads.items() if self.owns(name)}

    def share_updates(
        self,
        optimizer: DistributedOptimizer,
        updates: dict[str, Tensor],
        grads: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """Natural gradients of the owned layers → those of every layer in ``grads`` (the
        gradient matrices of every layer with a gradient, shaped like the updates)."""
        return updates

    def gather_layer_states(
        self, optimizer: DistributedOptimizer, states: dict[str, dict[str, Tensor]]
    ) -> dict[str, dict[str, Tensor]]:
        """This rank's per-layer checkpoint tensors → every layer's (for ``state_dict``)."""
        return states

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


class Local(Distributor):
    """One process, or ranks that deliberately train independently: no communication."""


# --- helpers on the protocol ---------------------------------------------------------------
def statistics(
    optimizer: DistributedOptimizer, layers: Sequence[KroneckerLayer]
) -> tuple[list[Tensor], list[bool], list[int]]:
    """The live accumulators of ``layers``, their AVG / SUM flags, and the index of the layer
    each belongs to (flattened over the layers, in order)."""
    tensors: list[Tensor] = []
    average: list[bool] = []
    layer_index: list[int] = []
    for index, layer in enumerate(layers):
        layer_tensors, layer_average = optimizer.statistics(layer)
        tensors.extend(layer_tensors)
        average.extend(layer_average)
        layer_index.extend([index] * len(layer_tensors))
    return tensors, average, layer_index


def _dtensor_types() -> tuple[type, ...]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover (torch without DTensor)
        return ()
    return (DTensor,)


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    types = _dtensor_types()
    return bool(types) and isinstance(t, types)


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` contains a module wrapped with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def parameter_checksums(params: list[Tensor]) -> Tensor:
    """One float64 sum per parameter: a cheap fingerprint to compare across ranks."""
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([p.detach().sum(dtype=torch.float64) for p in params])
