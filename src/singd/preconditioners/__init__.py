"""Per-layer preconditioners: one object per layer owning its state and accumulators."""

from singd.preconditioners.base import LayerPreconditioner, refresh_all
from singd.preconditioners.kfac import KFACPreconditioner
from singd.preconditioners.singd import SINGDPreconditioner

__all__ = ["KFACPreconditioner", "LayerPreconditioner", "SINGDPreconditioner", "refresh_all"]
