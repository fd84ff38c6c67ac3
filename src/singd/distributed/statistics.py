r"""Curvature statistics that a rank can form without holding the layer's factors.

SINGD's hook forms :math:`H_K = \hat\Pi(K^\top U K)` with the current factor
:math:`K`. In the sharded mode only the *owner* of a layer holds K, so every rank
(the owner included, so that all contributions have the same form) accumulates a
statistic that does not involve K, the statistics are reduced onto the owner, and
the owner forms :math:`H_K` from the reduced statistic with :func:`sandwich`. By
linearity of :math:`\hat\Pi` and of the sum over ranks and micro-batches,

.. math:: \hat\Pi\Bigl(K^\top \bigl(\tfrac1R \textstyle\sum_r U_r\bigr) K\Bigr)
          = \tfrac1R \textstyle\sum_r \hat\Pi(K^\top U_r K),

so the owner gets exactly what the replicated mode reduces (up to round-off). The
statistic is the part of :math:`U = A^\top A` that :math:`\hat\Pi(K^\top U K)`
depends on:

* a **diagonal** K needs only :math:`\operatorname{diag}(U)`, since
  :math:`\hat\Pi(K^\top U K) = k^2 \odot \operatorname{diag}(U)`; adapters compute it
  without unfolding convolutions or forming one-hot embedding inputs (O(d) to ship);
* any other structure gets the dense :math:`U` (O(d²) to ship, and transiently O(d²)
  memory on every rank). That is why the sharded mode pays off for large *dense*
  factors, and the replicated mode, which ships the structured :math:`H_K`, is the
  better choice for cheap structured factors.

The same holds for :math:`G = G_m^\top G_m` and C.
"""

from __future__ import annotations

import math

from torch import Tensor

from singd.layers.base import (
    LayerAdapter,
    grad_output_diagonal,
    grad_output_matrix,
    input_matrix,
)
from singd.structures import Dense, Diagonal, DiagonalMatrix, Structure, StructuredMatrix

_DENSE = Dense()
_DIAGONAL = Diagonal()


def _needs_only_diagonal(structure: Structure) -> bool:
    """Whether factors of ``structure`` form H from diag(U) alone (the structure's hook)."""
    return structure.matrix_cls.inner_needs_only_diagonal


def input_statistic(
    structure: Structure, adapter: LayerAdapter, module: object, x: Tensor, approx: str
) -> StructuredMatrix:
    r"""The statistic of :math:`U = A^\top A` that a factor K of ``structure`` needs.

    ``x`` must already be in K's dtype (floating inputs). Returns a diagonal matrix
    holding :math:`\operatorname{diag}(U)` if the structure needs only that, else the
    dense :math:`U`.
    """
    if _needs_only_diagonal(structure):
        diag = adapter.input_diagonal(module, x, approx)
        if x.is_floating_point():
            diag = diag.to(x.dtype)
        return DiagonalMatrix(_DIAGONAL, diag.shape[0], {"diag": diag})
    A = input_matrix(adapter, module, x, approx)
    return _DENSE.from_mat_inner(A.T)


def output_statistic(
    structure: Structure,
    adapter: LayerAdapter,
    module: object,
    g: Tensor,
    approx: str,
    loss_average: str | None,
    previous_scale: float = 1.0,
) -> StructuredMatrix:
    r"""The statistic of :math:`G = G_m^\top G_m / s_{t-1}` that a factor C of ``structure``
    needs (``g`` in C's dtype; :math:`s_{t-1}` the previous gradient scale, see
    :mod:`singd.amp`): its diagonal, computed without forming :math:`G_m`, or dense."""
    if _needs_only_diagonal(structure):
        diag = grad_output_diagonal(adapter, module, g, approx, loss_average)
        if previous_scale != 1.0:
            diag = diag / previous_scale
        return DiagonalMatrix(_DIAGONAL, diag.shape[0], {"diag": diag})
    Gm = grad_output_matrix(adapter, module, g, approx, loss_average)
    if previous_scale != 1.0:
        Gm = Gm / math.sqrt(previous_scale)
    return _DENSE.from_mat_inner(Gm.T)


def sandwich(K: StructuredMatrix, S: StructuredMatrix) -> StructuredMatrix:
    r""":math:`\hat\Pi(K^\top U K)` from a statistic ``S`` of :func:`input_statistic`.

    A diagonal statistic goes to the factor's ``from_inner_diagonal``. For a dense one,
    :math:`K^\top U K` is formed with K's own ``rmatmat`` (:math:`K^\top (K^\top U)^\top`,
    using :math:`U = U^\top`), symmetrised against round-off, and projected with the
    structure's :math:`\hat\Pi`.
    """
    if isinstance(S, DiagonalMatrix):
        return K.from_inner_diagonal(S.diag)
    U = S.to_dense().to(K.dtype)
    M = K.rmatmat(K.rmatmat(U).T)
    return K.structure.from_dense((M + M.T) / 2)
