r"""Batches of SINGD layers whose state tensors are *views* of joint tensors.

A batch (:mod:`singd.preconditioners.diagonal`, :mod:`singd.preconditioners.stacked`,
KFAC's :class:`~singd.preconditioners.kfac.KFACStack`) keeps the state of its layers
(SINGD's K, C, m_K, m_C; KFAC's S and P) in a few joint tensors (concatenated or
stacked) and gives every layer views of them, so a refresh reads all layers' state
without copying and writes a few new joint tensors. Whether a layer's state still
consists of those views is checked by identity (``is``): a checkpoint load, a refresh
undone or a layer refreshed outside the batch replaces its tensors, and the batch
joins them afresh at its next use. Identity checks cost nothing on the device and,
unlike version counters, do not change at every step, so compiled code can guard on
them without recompiling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from torch import Tensor, nn

from singd.functional.scalars import Scalar, is_one
from singd.preconditioners.base import LayerPreconditioner, Refreshed

#: The factors of a SINGD layer's state, in the order the batches join them.
FACTOR_NAMES = ("K", "C", "m_K", "m_C")

Pre = TypeVar("Pre", bound=LayerPreconditioner)


class JointStateBatch(ABC, Generic[Pre]):
    """The preconditioners of one batch and the views of the joint state they hold.

    Args:
        pres: The batch's preconditioners, in the optimizer's layer order.
    """

    def __init__(self, pres: Sequence[Pre]) -> None:
        self.pres = list(pres)
        #: per layer, the views of the joint tensors its state was given (``install``)
        self.views: list[list[Tensor | None]] = []

    @abstractmethod
    def layer_tensors(self, pre: Pre) -> list[Tensor | None] | None:
        """The tensors of a layer's state that are views of the joint ones, in the
        order of :attr:`views` (None: the layer has no state yet)."""

    def synced(self) -> bool:
        """Whether every layer's state still consists of the views it was given."""
        if len(self.views) != len(self.pres):
            return False
        for pre, views in zip(self.pres, self.views, strict=True):
            current = self.layer_tensors(pre)
            if (
                current is None
                or len(current) != len(views)
                or any(a is not b for a, b in zip(current, views, strict=True))
            ):
                return False
        return True

    @abstractmethod
    def refresh(self, lr_cov: Scalar, h_c_unscale: Scalar) -> Refreshed:
        """Refresh every layer from its statistics (consumed), into new joint tensors."""

    @abstractmethod
    def precondition(self, grad_divisor: Scalar) -> list[list[Tensor]]:
        """The natural gradient of every layer (all parameters with gradients), split
        like ``layer.params``, the gradients divided by ``grad_divisor`` first."""

    def snapshot(self) -> Callable[[], None]:
        """Take every layer's state and statistics (references) as they are, before a
        refresh replaces them. Returns the refresh's undo (the step raised): it puts
        them back and drops the joint state (:meth:`forget`)."""
        pres = self.pres
        before = [pre.state for pre in pres]
        statistics = [pre.statistics_snapshot() for pre in pres]

        def undo() -> None:
            for pre, state, stats in zip(pres, before, statistics, strict=True):
                pre.state = state
                pre.restore_statistics(stats)
            self.forget()

        return undo

    def checks(self) -> list[tuple[str, list[Tensor]]]:
        """(layer name, the views it holds) per layer, for the step guard
        (:attr:`~singd.preconditioners.base.Refreshed.checks`: what must be finite)."""
        return [
            (pre.name, [t for t in views if t is not None])
            for pre, views in zip(self.pres, self.views, strict=True)
        ]

    def forget(self) -> None:
        """Join the layers' state afresh at the next use (a refresh was undone); a
        subclass drops its joint tensors too."""
        self.views = []


def stacked_gradients(pres: Sequence[LayerPreconditioner], grad_divisor: Scalar) -> Tensor:
    r"""The gradient matrices ``[L, d_C, d_K]`` of equal layers (every parameter with a
    gradient; :meth:`~singd.layers.LayerAdapter.stacked_grad_matrices` of their adapter
    class), divided by ``grad_divisor``."""
    adapters = [pre.layer.adapter for pre in pres]
    G = type(adapters[0]).stacked_grad_matrices(adapters)
    if not is_one(grad_divisor):
        G = G / grad_divisor
    return G


def split_directions(N: Tensor, pres: Sequence[LayerPreconditioner]) -> list[list[Tensor]]:
    """``[L, d_C, d_K]`` directions back to each layer's parameter shapes (the inverse of
    :func:`stacked_gradients`)."""
    adapters = [pre.layer.adapter for pre in pres]
    return type(adapters[0]).split_stacked(N, adapters)


def stackable(pre: LayerPreconditioner, kl_clip: float | None) -> bool:
    """Whether ``pre``'s layer can join a batch: its factors are on this rank (not the
    sharded mode's factor-free statistics), no KL clipping (which needs each layer's
    gradient–update product), and plain tensor parameters (DTensors and other
    subclasses: one at a time)."""
    return not (
        pre.factor_free_statistics
        or kl_clip is not None
        or any(type(p) not in (Tensor, nn.Parameter) for p in pre.layer.params)
    )


def layout_key(pre: LayerPreconditioner) -> tuple[Hashable, ...]:
    """What equal layers of a stack share besides their options: the adapter class (the
    gradient matrix's layout), the parameters' shapes and dtypes, the device."""
    params = pre.layer.params
    return (
        type(pre.layer.adapter),
        tuple(tuple(p.shape) for p in params),
        tuple(p.dtype for p in params),
        pre.layer.weight.device,
    )


def cached_batch(
    pres: Sequence[Pre], kind: type[JointStateBatch[Pre]], cache: dict[tuple[str, ...], Any]
) -> JointStateBatch[Pre]:
    """The ``kind`` batch of ``pres``, kept in ``cache`` (the first layer's) by layer names,
    so its joint state lives across steps."""
    names = tuple(pre.name for pre in pres)
    cached = cache.get(names)
    if cached is None or type(cached) is not kind:
        if len(cache) >= 8:  # (layer sets that vary from step to step)
            cache.clear()
        cached = cache[names] = kind(pres)
    return cached
