r"""What a distribution strategy may see of the optimizer it serves: one small protocol.

The strategies of :mod:`singd.distributed` (:class:`~singd.distributed.Replicated`,
:class:`~singd.distributed.Sharded`, :class:`~singd.distributed.FSDP2`) never import
:mod:`singd.optim` and never touch private optimizer members: everything they read or
change goes through :class:`DistributedOptimizer`, which
:class:`~singd.optim.base.KroneckerOptimizer` implements. A third-party optimizer that
implements it can use the strategies too.

=================================  =========================================================
member                             what a strategy uses it for
=================================  =========================================================
``model``                          the (unwrapped) model: initial broadcast, wrapper checks
``steps``                          the step counter (periodic consistency checks)
``param_groups``                   the parameters, for checksums and sharding checks
``layers``                         every layer with Kronecker factors, by name
``due_layers()``                   the layers whose statistics are reduced in this step
``statistics(layer)``              their accumulators, to reduce in place, with AVG/SUM flags
``drop_statistics(layer)``         forget a layer's accumulators (another rank owns it)
``gradients()``                    every gradient the optimizer applies, with AVG/SUM flags
``factor_sizes(layer)``            stored entries of K and C (the ownership cost model)
``param_name(p)``                  a parameter's name, for error messages
=================================  =========================================================

**AVG or SUM** (derived in ``docs/distributed.md``): a flag True means "average over
ranks", False "sum". Input-side statistics are always averaged; output-side statistics
and gradients are averaged unless the loss is summed (``loss_average=None``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class KroneckerLayer(Protocol):
    """A layer with Kronecker factors, as a strategy sees it."""

    @property
    def name(self) -> str:
        """The module's name in the model."""
        ...

    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter (its ``.grad`` says whether the layer has a gradient)."""
        ...

    @property
    def params(self) -> list[nn.Parameter]:
        """Weight and bias (if any)."""
        ...


@runtime_checkable
class DistributedOptimizer(Protocol):
    """The optimizer side of the distribution seam (module docstring)."""

    model: nn.Module
    steps: int
    param_groups: list[dict[str, Any]]

    @property
    def layers(self) -> Mapping[str, KroneckerLayer]:
        """Every layer with Kronecker factors, by name, in registration order (the same
        order on every rank)."""
        ...

    def due_layers(self) -> Sequence[KroneckerLayer]:
        """The layers refreshed in this step: due (``steps % T == 0``) and with a gradient."""
        ...

    def statistics(self, layer: KroneckerLayer) -> tuple[list[Tensor], list[bool]]:
        """The live accumulator tensors of a due layer (reduced in place) and their AVG
        (True) / SUM (False) flags."""
        ...

    def drop_statistics(self, layer: KroneckerLayer) -> None:
        """Forget a layer's accumulators (this rank does not refresh it)."""
        ...

    def gradients(self) -> tuple[list[Tensor], list[bool]]:
        """The gradients of every parameter the optimizer updates (Kronecker layers and the
        fallback), in param-group order, with their AVG / SUM flags."""
        ...

    def factor_sizes(self, layer: KroneckerLayer) -> tuple[int, int]:
        """The numbers of stored entries of the layer's two factors (K and C)."""
        ...

    def param_name(self, param: Tensor) -> str:
        """The name of a parameter in the model (for messages)."""
        ...
