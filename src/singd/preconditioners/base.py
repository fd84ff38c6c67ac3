r"""One object per layer that owns its preconditioner state and accumulators.

A Kronecker optimizer (:class:`~singd.optim.base.KroneckerOptimizer`) keeps one
:class:`LayerPreconditioner` per registered layer, in one
``dict[str, LayerPreconditioner]`` keyed by module name; forgetting a layer is
deleting its entry, skipping a step clears every entry's statistics.

Life of a preconditioner within a step ``t`` (the optimizer drives it):

1. :meth:`~LayerPreconditioner.accumulate` ``(x, g)`` once per forward/backward
   pair through the layer at refresh steps (``t % T == 0``);
2. data parallelism reduces :meth:`~LayerPreconditioner.statistics` in place (the
   live accumulator tensors) or drops them (:meth:`~LayerPreconditioner.drop_statistics`);
3. :meth:`~LayerPreconditioner.refresh` turns the statistics into new state and
   returns an all-finite flag (a device tensor, not synchronised) and an undo;
4. :meth:`~LayerPreconditioner.precondition` maps the ``[d_C, d_K]`` gradient
   matrix to the natural gradient.

Tensors are plain attributes (no closures hold them), and everything a refresh
needs besides the live ``lr_cov`` is on the object (:attr:`plan`,
:attr:`config`), so preconditioners with equal plans can be processed as a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from singd.config import GroupConfig, LayerPlan
    from singd.layers import Layer


class LayerPreconditioner(ABC):
    """The preconditioner state and curvature accumulators of one layer.

    Args:
        layer: The layer (name and bound adapter).
        plan: Structures, dtypes and dimensions of its factors.
        config: The validated options of the layer's param group (replaced by the
            optimizer when the group is edited).
        factor_free_statistics: Accumulate statistics that need no factors (the
            sharded mode: only the owner rank holds the factors).
    """

    def __init__(
        self,
        layer: Layer,
        plan: LayerPlan,
        config: GroupConfig,
        *,
        factor_free_statistics: bool = False,
    ) -> None:
        self.layer = layer
        self.plan = plan
        self.config = config
        self.factor_free_statistics = factor_free_statistics

    @property
    def name(self) -> str:
        """The layer's module name."""
        return self.layer.name

    @property
    def dtype_K(self) -> torch.dtype:
        """The dtype of the input-side state (the plan's, else the weight's)."""
        return self.plan.dtype_K or self.layer.weight.dtype

    @property
    def dtype_C(self) -> torch.dtype:
        """The dtype of the output-side state (the plan's, else the weight's)."""
        return self.plan.dtype_C or self.layer.weight.dtype

    # --- statistics ------------------------------------------------------------------
    @abstractmethod
    def accumulate(self, x: Tensor, g: Tensor, previous_scale: float) -> None:
        r"""Add one forward/backward pair's statistics (``g`` carries :math:`\sqrt{s_{t-1}}`)."""

    @abstractmethod
    def has_statistics(self) -> bool:
        """Whether statistics were accumulated since the last refresh."""

    @abstractmethod
    def statistics(self) -> tuple[list[Tensor], list[Tensor]]:
        """The live accumulator tensors (input side, output side), reduced in place
        over ranks by :mod:`singd.distributed`."""

    @abstractmethod
    def drop_statistics(self) -> None:
        """Drop the accumulators (a skipped step; another rank owns the layer)."""

    #: The attributes that hold the accumulators (for :meth:`statistics_snapshot`).
    ACCUMULATORS: tuple[str, ...] = ()

    def statistics_snapshot(self) -> dict[str, Any]:
        """The accumulators as they are (references), to put back if a step raises."""
        return {name: getattr(self, name) for name in self.ACCUMULATORS}

    def restore_statistics(self, snapshot: Mapping[str, Any]) -> None:
        """Put back what :meth:`statistics_snapshot` returned."""
        for name, value in snapshot.items():
            setattr(self, name, value)

    # --- state -----------------------------------------------------------------------
    @abstractmethod
    def refresh(self, lr_cov: float, h_c_unscale: float) -> tuple[Tensor, Callable[[], None]]:
        """Update the state from the accumulated statistics (which are consumed).

        Returns:
            A boolean scalar tensor (all new state finite; not synchronised) and a
            function that restores the state from before this refresh.
        """

    @abstractmethod
    def precondition(self, G: Tensor) -> Tensor:
        """Apply the preconditioner to the ``[d_C, d_K]`` gradient matrix."""

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """The state as named tensors (empty before the first allocation)."""

    @abstractmethod
    def expected_state(self) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
        """(shape of every tensor :meth:`state_dict` holds, names that may be missing or
        present though not held), for checking a checkpoint before loading it."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (tensors are copied)."""

    @abstractmethod
    def describe(self) -> tuple[str, int]:
        """(text describing the factors, bytes of state; projected before allocation)."""
