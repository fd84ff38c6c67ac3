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

from torch import Tensor

from singd.layers.base import LayerAdapter, input_matrix
from singd.structures import Dense, Diagonal, DiagonalMatrix, Structure, StructuredMatrix

_DENSE = Dense()


def input_statistic(
    structure: Structure, adapter: LayerAdapter, module: object, x: Tensor, approx: str
) -> StructuredMatrix:
    r"""The statistic of :math:`U = A^\top A` a factor K of ``structure`` needs.

    ``x`` must already be in K's dtype (floating inputs). Returns a diagonal matrix
    holding :math:`\operatorname{diag}(U)` for a diagonal K, else the dense :math:`U`.
    """
    if isinstance(structure, Diagonal):
        diag = adapter.input_diagonal(module, x, approx)  # type: ignore[arg-type]
        if x.is_floating_point():
            diag = diag.to(x.dtype)
        return DiagonalMatrix(structure, diag.shape[0], {"diag": diag})
    A = input_matrix(adapter, module, x, approx)  # type: ignore[arg-type]
    return _DENSE.from_mat_inner(A.T)


def output_statistic(structure: Structure, Gm: Tensor) -> StructuredMatrix:
    r"""The statistic of :math:`G = G_m^\top G_m` a factor C of ``structure`` needs."""
    if isinstance(structure, Diagonal):
        return DiagonalMatrix(structure, Gm.shape[1], {"diag": (Gm * Gm).sum(0)})
    return _DENSE.from_mat_inner(Gm.T)


def sandwich(K: StructuredMatrix, S: StructuredMatrix) -> StructuredMatrix:
    r""":math:`\hat\Pi(K^\top U K)` from the statistic ``S`` of :func:`input_statistic`.

    For a dense statistic, :math:`K^\top U K` is formed with K's own ``rmatmat``
    (:math:`K^\top (K^\top U)^\top`, using :math:`U = U^\top`), symmetrised against
    round-off, and projected with the structure's :math:`\hat\Pi`.
    """
    if isinstance(S, DiagonalMatrix):
        if not isinstance(K, DiagonalMatrix):
            raise TypeError(f"A diagonal statistic needs a diagonal factor, got {K.structure}.")
        return DiagonalMatrix(K.structure, K.dim, {"diag": K.diag.square() * S.diag.to(K.dtype)})
    U = S.to_dense().to(K.dtype)
    M = K.rmatmat(K.rmatmat(U).T)
    return K.structure.from_dense((M + M.T) / 2)
