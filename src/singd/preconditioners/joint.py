r"""Batches of SINGD layers whose state tensors are *views* of joint tensors.

A batch (:mod:`singd.preconditioners.diagonal`, :mod:`singd.preconditioners.stacked`)
keeps the K, C, m_K, m_C of its layers in a few joint tensors (concatenated or
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
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from singd.functional import FactorState
from singd.functional.scalars import Scalar
from singd.preconditioners.base import Refreshed

if TYPE_CHECKING:
    from singd.preconditioners.singd import SINGDPreconditioner

#: The factors of a layer's state, in the order the batches join them.
FACTOR_NAMES = ("K", "C", "m_K", "m_C")


class JointStateBatch(ABC):
    """The preconditioners of one batch and the views of the joint state they hold.

    Args:
        pres: The batch's preconditioners, in the optimizer's layer order.
    """

    def __init__(self, pres: Sequence[SINGDPreconditioner]) -> None:
        self.pres = list(pres)
        #: per layer, the views of the joint tensors its state was given (``install``)
        self.views: list[list[Tensor | None]] = []

    @staticmethod
    @abstractmethod
    def layer_tensors(state: FactorState) -> list[Tensor | None]:
        """The tensors of a layer's state that are views of the joint ones, in the
        order of :attr:`views`."""

    def synced(self) -> bool:
        """Whether every layer's state still consists of the views it was given."""
        if len(self.views) != len(self.pres):
            return False
        for pre, views in zip(self.pres, self.views, strict=True):
            if pre.state is None:
                return False
            current = self.layer_tensors(pre.state)
            if len(current) != len(views) or any(
                a is not b for a, b in zip(current, views, strict=True)
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

    def forget(self) -> None:
        """Join the layers' state afresh at the next use (a refresh was undone)."""
        self.views = []
