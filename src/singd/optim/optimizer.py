"""The poster's import path: ``from singd.optim.optimizer import SINGD``.

SINGD lives in :mod:`singd.optim.singd`; this module re-exports it (and the
curvature helpers that used to live here).
"""

from singd.optim.singd import SINGD, input_curvature, output_curvature

__all__ = ["SINGD", "input_curvature", "output_curvature"]
