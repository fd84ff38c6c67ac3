"""Optimizers: :class:`SINGD` (IKFAC, INGD, SINGD) and the :class:`KFAC` baseline."""

from singd.optim.kfac import KFAC
from singd.optim.optimizer import SINGD

__all__ = ["KFAC", "SINGD"]
