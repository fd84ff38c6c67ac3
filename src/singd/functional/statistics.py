r"""Curvature statistics of one layer, from its input and output gradient (pure functions).

SINGD's factor update needs :math:`H_K = \hat\Pi(K^\top U K)` and
:math:`H_C = \hat\Pi(C^\top G C)` with :math:`U = A^\top A` and :math:`G = G_m^\top G_m`
(:mod:`singd.layers` forms :math:`A` and :math:`G_m`). There are two ways to get there,
equal by linearity of :math:`\hat\Pi` and of sums over micro-batches and ranks:

* **projected** — :func:`input_curvature`, :func:`output_curvature`: form :math:`H` in
  the backward hook with the current factor, from the rows of :math:`A` (2d²·rows for a
  dense K); the accumulated statistic is as small as the factor;
* **factor-free** — :func:`input_statistic`, :func:`output_statistic`, then
  :func:`sandwich` once at the refresh: accumulate the part of :math:`U` (:math:`G`) that
  :math:`\hat\Pi(K^\top U K)` depends on, without K. A rank that does not hold K (the
  sharded and FSDP2 strategies of :mod:`singd.distributed`) can still form it; the
  statistics are reduced onto the factor's owner, which applies

  .. math:: \hat\Pi\Bigl(K^\top \bigl(\tfrac1R \textstyle\sum_r U_r\bigr) K\Bigr)
            = \tfrac1R \textstyle\sum_r \hat\Pi(K^\top U_r K).

  The statistic is :math:`\operatorname{diag}(U)` for a factor whose structure needs
  only that (``inner_needs_only_diagonal``: :math:`\hat\Pi(K^\top U K) = k^2 \odot
  \operatorname{diag}(U)` for a diagonal K; adapters compute it without unfolding
  convolutions or forming one-hot embedding inputs), else the dense :math:`U`.

**Gradient scale.** Under a GradScaler the output gradients carry the previous scale
:math:`s_{t-1}` (:mod:`singd.amp`); every output-side statistic here is divided by it —
its squares carry :math:`s_{t-1}` once — in this one place (:func:`_unscaled_output`).
"""

from __future__ import annotations

import math
from typing import Any

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


def _unscaled_output(
    adapter: LayerAdapter[Any],
    g: Tensor,
    approx: str,
    loss_average: str | None,
    previous_scale: float,
    diagonal: bool,
) -> Tensor:
    r""":math:`\operatorname{diag}(G_m^\top G_m) / s_{t-1}` (``diagonal``), else
    :math:`G_m / \sqrt{s_{t-1}}`."""
    if diagonal:
        diag = grad_output_diagonal(adapter, g, approx, loss_average)
        return diag / previous_scale if previous_scale != 1.0 else diag
    Gm = grad_output_matrix(adapter, g, approx, loss_average)
    return Gm / math.sqrt(previous_scale) if previous_scale != 1.0 else Gm


# --- projected: H = Π̂(Kᵀ U K) in the hook ---------------------------------------------------
def input_curvature(
    K: StructuredMatrix, adapter: LayerAdapter[Any], x: Tensor, approx: str
) -> StructuredMatrix:
    r""":math:`H_K = \hat\Pi(K^\top A^\top A K)` from the layer input.

    A diagonal K (``inner_needs_only_diagonal``) needs only
    :math:`\operatorname{diag}(A^\top A)`, which adapters compute without forming
    :math:`A` (unfolded convolution patches, one-hot embedding inputs).
    """
    if x.is_floating_point():  # (embedding inputs are indices)
        x = x.to(K.dtype)
    if K.inner_needs_only_diagonal:
        return K.from_inner_diagonal(adapter.input_diagonal(x, approx))
    return K.from_inner(input_matrix(adapter, x, approx).T)


def output_curvature(
    C: StructuredMatrix,
    adapter: LayerAdapter[Any],
    g: Tensor,
    approx: str,
    loss_average: str | None,
    previous_scale: float = 1.0,
) -> StructuredMatrix:
    r""":math:`H_C = \hat\Pi(C^\top G_m^\top G_m C) / s_{t-1}` from the output gradient.

    A diagonal C (``inner_needs_only_diagonal``) needs only
    :math:`\operatorname{diag}(G_m^\top G_m)`, computed without forming :math:`G_m`.
    """
    diagonal = C.inner_needs_only_diagonal
    out = _unscaled_output(adapter, g, approx, loss_average, previous_scale, diagonal)
    return C.from_inner_diagonal(out) if diagonal else C.from_inner(out.T)


# --- factor-free: U (or diag U), projected at the refresh --------------------------------------
def input_statistic(
    structure: Structure, adapter: LayerAdapter[Any], x: Tensor, approx: str
) -> StructuredMatrix:
    r"""The statistic of :math:`U = A^\top A` that a factor K of ``structure`` needs.

    ``x`` must already be in K's dtype (floating inputs). Returns a diagonal matrix
    holding :math:`\operatorname{diag}(U)` if the structure needs only that, else the
    dense :math:`U`.
    """
    if structure.matrix_cls.inner_needs_only_diagonal:
        diag = adapter.input_diagonal(x, approx)
        if x.is_floating_point():
            diag = diag.to(x.dtype)
        return DiagonalMatrix(_DIAGONAL, diag.shape[0], {"diag": diag})
    return _DENSE.from_mat_inner(input_matrix(adapter, x, approx).T)


def output_statistic(
    structure: Structure,
    adapter: LayerAdapter[Any],
    g: Tensor,
    approx: str,
    loss_average: str | None,
    previous_scale: float = 1.0,
) -> StructuredMatrix:
    r"""The statistic of :math:`G = G_m^\top G_m / s_{t-1}` that a factor C of ``structure``
    needs (``g`` in C's dtype): its diagonal, computed without forming :math:`G_m`, or
    dense."""
    diagonal = structure.matrix_cls.inner_needs_only_diagonal
    out = _unscaled_output(adapter, g, approx, loss_average, previous_scale, diagonal)
    if diagonal:
        return DiagonalMatrix(_DIAGONAL, out.shape[0], {"diag": out})
    return _DENSE.from_mat_inner(out.T)


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
