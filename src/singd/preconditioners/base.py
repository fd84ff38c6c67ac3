r"""One object per layer that owns its preconditioner state and accumulators.

A Kronecker optimizer (:class:`~singd.optim.base.KroneckerOptimizer`) keeps one
:class:`LayerPreconditioner` per registered layer, in one
``dict[str, LayerPreconditioner]`` keyed by module name; forgetting a layer is
deleting its entry, skipping a step clears every entry's statistics.

Life of a preconditioner within a step ``t`` (the optimizer drives it):

1. :meth:`~LayerPreconditioner.accumulate` ``(x, g)`` once per forward/backward
   pair through the layer at refresh steps (``t % T == 0``), or
   :meth:`~LayerPreconditioner.accumulate_batch` for the pairs of layers with equal
   :meth:`~LayerPreconditioner.statistics_key` at the end of the backward pass;
2. data parallelism reduces :meth:`~LayerPreconditioner.statistics` in place (the
   live accumulator tensors) or drops them (:meth:`~LayerPreconditioner.drop_statistics`);
3. :meth:`~LayerPreconditioner.refresh` turns the statistics into *new* state
   tensors (the old ones stay untouched until the step guard commits,
   :mod:`singd.optim.guard`) and returns an undo;
4. :meth:`~LayerPreconditioner.precondition` maps the ``[d_C, d_K]`` gradient
   matrix to the natural gradient.

**Batches.** Tensors are plain attributes (no closures hold them), and everything a
refresh needs besides the live ``lr_cov`` is on the object (:attr:`plan`,
:attr:`config`), so preconditioners with equal plans can be processed together: the
optimizer groups the preconditioners of a param group by :meth:`batch_key` and calls
the class's :meth:`refresh_batch` and :meth:`precondition_batch` once per batch. The
default is one layer at a time (:meth:`refresh` and :meth:`precondition`); a
preconditioner class whose math has a multi-tensor form overrides them, so that the
number of operations of a step grows with the number of distinct layer kinds, not of
layers: SINGD's diagonal factors of any sizes (:mod:`singd.preconditioners.diagonal`),
and equal layers of SINGD (every structure) and KFAC as stacks under ``torch.vmap``
(:mod:`singd.preconditioners.stacked`, :class:`~singd.preconditioners.kfac.KFACStack`;
the shared machinery in :mod:`singd.preconditioners.joint`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from singd.config import GroupConfig, LayerPlan
    from singd.functional.scalars import Scalar
    from singd.layers import Layer


@dataclasses.dataclass
class Refreshed:
    """What refreshing a batch of preconditioners produced, for the step guard.

    Attributes:
        checks: (layer name, new state tensors that must be finite) per layer.
        replaced: (new, old) tensor lists: the guard writes ``where(ok, new, old)``
            into the new tensors (:meth:`~singd.optim.guard.StepGuard.select_`).
        undo: Restores the state and statistics from before (the step raised).
        after_commit: Runs once the new tensors hold the committed values (to refill
            buffers derived from them).
    """

    checks: list[tuple[str, list[Tensor]]] = dataclasses.field(default_factory=list)
    replaced: list[tuple[list[Tensor], list[Tensor]]] = dataclasses.field(default_factory=list)
    undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    after_commit: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def extend(self, other: Refreshed) -> None:
        """Add what another batch produced."""
        self.checks += other.checks
        self.replaced += other.replaced
        self.undo += other.undo
        self.after_commit += other.after_commit


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

    def statistics_key(self, x: Tensor, g: Tensor) -> Hashable | None:
        """The key under which this pass's ``(x, g)`` may wait for those of other layers,
        to be accumulated together (:meth:`accumulate_batch`, :mod:`singd.optim.pending`);
        None: :meth:`accumulate` at once.

        Layers wait for each other if their class batches the statistics (overrides
        :meth:`accumulate_batch`), their :meth:`batch_key`, adapter class and parameter
        shapes and dtypes are equal, their adapters' statistics signatures are equal and
        not None (:meth:`~singd.layers.LayerAdapter.statistics_signature`: what else of
        the module the statistics read, a convolution's stride, padding, …), and ``x``
        and ``g`` have equal shapes and dtypes.
        """
        if type(self).accumulate_batch.__func__ is LayerPreconditioner.accumulate_batch.__func__:  # type: ignore[attr-defined]
            return None
        adapter = self.layer.adapter
        if not x.is_floating_point():
            return None
        signature = adapter.statistics_signature(x)
        if signature is None:
            return None
        key = self.batch_key()
        if key is None:
            return None
        # (a batch key need not fix the parameters: diagonal batches take any sizes, and
        # a Linear layer's x and g do not tell whether it has a bias)
        params = tuple((tuple(p.shape), p.dtype) for p in self.layer.params)
        shapes = (tuple(x.shape), x.dtype, tuple(g.shape), g.dtype)
        plan = self.plan
        out = (
            type(self),
            type(adapter),
            signature,
            key,
            params,
            shapes,
            plan.approx,
            plan.loss_average_name,
        )
        try:
            hash(out)
        except TypeError:  # (a signature of unhashable values: one layer at a time)
            return None
        return out

    @classmethod
    def accumulate_batch(
        cls,
        pres: Sequence[LayerPreconditioner],
        xs: Sequence[Tensor],
        gs: Sequence[Tensor],
        previous_scale: float,
    ) -> None:
        """:meth:`accumulate` for layers with equal :meth:`statistics_key` (one pass each);
        by default one at a time."""
        for pre, x, g in zip(pres, xs, gs, strict=True):
            pre.accumulate(x, g, previous_scale)

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

    #: The layer's state, in its class's form (SINGD: a
    #: :class:`~singd.functional.FactorState`; KFAC: a dict of tensors); None until it
    #: is allocated. A batch (:mod:`singd.preconditioners.joint`) replaces it with views
    #: of its joint tensors and puts the one from before back when a refresh is undone.
    state: object

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
    def refresh(self, lr_cov: Scalar, h_c_unscale: Scalar) -> Callable[[], None]:
        """Update the state from the accumulated statistics (which are consumed).

        The new state is held in new tensors (:meth:`state_dict` returns them); the
        old ones are left as they were, so the step guard can choose between them.

        Returns:
            A function that restores the state from before this refresh.
        """

    @abstractmethod
    def precondition(self, G: Tensor) -> Tensor:
        """Apply the preconditioner to the ``[d_C, d_K]`` gradient matrix."""

    # --- batches (module docstring) ----------------------------------------------------
    def batch_key(self) -> Hashable | None:
        """Preconditioners of one class with equal keys are refreshed and preconditioned
        together (:meth:`refresh_batch`, :meth:`precondition_batch`); None: alone."""
        return None

    @classmethod
    def refresh_batch(
        cls, batch: Sequence[LayerPreconditioner], lr_cov: Scalar, h_c_unscale: Scalar
    ) -> Refreshed:
        """Refresh every preconditioner of ``batch`` (all with statistics) with the
        live β₁ ``lr_cov``; by default one at a time (:meth:`refresh`).

        Raises:
            RuntimeError: If a refresh wrote its state in place (the guard needs the
                old tensors until the step commits).
        """
        out = Refreshed()
        for pre in batch:
            statistics = pre.statistics_snapshot()
            old = pre.state_dict()
            restore = pre.refresh(lr_cov, h_c_unscale)

            def undo(
                pre: LayerPreconditioner = pre,
                restore: Callable[[], None] = restore,
                statistics: dict[str, Any] = statistics,
            ) -> None:
                restore()
                pre.restore_statistics(statistics)

            out.undo.append(undo)
            new = pre.state_dict()
            names = [k for k in new if k in old]
            if any(new[k] is old[k] for k in names):
                raise RuntimeError(
                    f"The refresh of layer {pre.name!r} wrote its state in place; the step "
                    "guard needs new tensors (the old ones are kept until the step commits)."
                )
            out.checks.append((pre.name, list(new.values())))
            out.replaced.append(([new[k] for k in names], [old[k] for k in names]))
        return out

    @classmethod
    def precondition_batch(
        cls, batch: Sequence[LayerPreconditioner], grad_divisor: Scalar
    ) -> list[list[Tensor]]:
        """The natural gradient of every layer of ``batch`` (of equal :meth:`batch_key`,
        not None; every parameter with a gradient), split like ``layer.params``, as new
        tensors; the gradients are divided by ``grad_divisor`` first."""
        raise NotImplementedError(f"{cls.__name__} has no batched preconditioning.")

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
