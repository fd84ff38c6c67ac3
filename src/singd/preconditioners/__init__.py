"""Per-layer preconditioners: one object per layer owning its state and accumulators."""

from singd.preconditioners.base import LayerPreconditioner
from singd.preconditioners.kfac import KFACPreconditioner
from singd.preconditioners.singd import SINGDPreconditioner

__all__ = ["KFACPreconditioner", "LayerPreconditioner", "SINGDPreconditioner"]
