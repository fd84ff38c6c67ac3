r"""Rank-k triangular factors: a diagonal plus :math:`k` dense rows or columns.

The published code has the four rank-1 patterns of spec §3.8 (``TrilTopLeftDiagonal``
etc., dense fallbacks, not registered). Here they come for any :math:`k \ge 1`, exact,
in :math:`O(kd)` memory and :math:`O(kdn)` time, under four names. The corner in the
name is where the *diagonal* block sits, as in the published class names;
:math:`D` is diagonal (size :math:`d-k`), :math:`L`/:math:`U` are dense :math:`k\times k`
lower/upper triangles, :math:`B` is dense:

========================  ==============================================  =============
name                      pattern                                         dense part
========================  ==============================================  =============
``tril_top_left(k)``      :math:`\begin{pmatrix} D&0\\ B&L\end{pmatrix}`  last rows
``tril_bottom_right(k)``  :math:`\begin{pmatrix} L&0\\ B&D\end{pmatrix}`  first columns
``triu_top_left(k)``      :math:`\begin{pmatrix} D&B\\ 0&U\end{pmatrix}`  last columns
``triu_bottom_right(k)``  :math:`\begin{pmatrix} U&B\\ 0&D\end{pmatrix}`  first rows
========================  ==============================================  =============

Each is a lower/upper triangular matrix whose strictly triangular part has rank at
most :math:`k` (for :math:`d \le k`: a dense triangle). The published aliases
``"triltopleftdiagonal"`` etc. give :math:`k = 1`.

**Group closure.** With :math:`\mathcal Z` the :math:`k` indices of the dense
rows/columns and :math:`\mathcal C` the others, every pattern is an *arrow*
(:mod:`singd.structures._arrow`): a triangle :math:`K_{\mathcal Z\mathcal Z}`, a diagonal
:math:`K_{\mathcal C\mathcal C}`, and dense rows :math:`K_{\mathcal Z\mathcal C}`
(``tril_top_left``, ``triu_bottom_right``) or dense columns :math:`K_{\mathcal C
\mathcal Z}` (the other two), the opposite block being zero. Products keep this form
(triangle·triangle, diagonal·diagonal, and the dense block stays on its side). A dense
:math:`k\times k` corner would be closed as well, but the name promises a triangular
matrix, so the corner is a triangle and the Lie algebra has the same pattern.

**Projection** (spec §3.3): the triangle takes :math:`S_{ij} + S_{ji}` off its diagonal
(twice the entry of a symmetric :math:`S`) and :math:`S_{ii}` on it, the dense block
absorbs its mirror (:math:`B = 2 S_{\mathcal Z\mathcal C}` or :math:`2 S_{\mathcal C
\mathcal Z}`), the diagonal copies :math:`\operatorname{diag} S_{\mathcal C\mathcal C}`.

**from_inner** follows the arrow formulas: dense rows from :math:`X_{\mathcal Z} X^\top`
and row norms (:math:`kdn`), dense columns from the :math:`k` rows
:math:`S_{\mathcal Z}` of :math:`S = K^\top X` (:math:`2kdn`); no ``d × d`` or
``d × n`` temporary.

**Orientation.** The upper patterns are the flips :math:`J\,\cdot\,J` of the lower
ones (``triu_bottom_right`` = :math:`J`\ ``tril_top_left``\ :math:`J`, ``triu_top_left``
= :math:`J`\ ``tril_bottom_right``\ :math:`J`, with :math:`J` the exchange matrix); in
the arrow form the flip only moves :math:`\mathcal Z` to the other end and turns the
triangle, so one implementation serves all four (the duality is a property test),
without copying ``X`` to flip it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from singd.structures import _arrow
from singd.structures.base import Structure, StructuredMatrix, check_size


@dataclasses.dataclass(frozen=True)
class RankTriangular(Structure):
    """Rank-k triangular factors (module docstring); the subclasses fix the pattern.

    Args:
        rank: :math:`k`, the number of dense rows or columns.
    """

    rank: int = 1
    #: Lower (True) or upper triangular.
    lower: ClassVar[bool]
    #: Dense rows (True) or dense columns.
    dense_rows: ClassVar[bool]

    def __post_init__(self) -> None:
        check_size("rank", self.rank, minimum=1)

    def sizes(self, dim: int) -> tuple[int, int]:
        r"""``(a, e)``: :math:`\mathcal Z` is the first ``a`` or the last ``e`` indices."""
        k = min(self.rank, dim)
        # the dense rows of a lower matrix are its last ones, of an upper one its first
        # ones; dense columns the other way round
        return (k, 0) if self.lower != self.dense_rows else (0, k)

    def project_triangle(self, Q_ZZ: Tensor) -> Tensor:
        """:math:`\\hat\\Pi` onto the ``k × k`` lower or upper triangle."""
        ones = torch.ones_like(Q_ZZ, dtype=torch.bool)
        return _arrow.project_masked(Q_ZZ, ones.tril() if self.lower else ones.triu())

    def _matrix(self, dim: int, tri: Tensor, off: Tensor, diag: Tensor) -> RankTriangularMatrix:
        tensors = {"tri": tri, "off": off, "diag": diag}
        return RankTriangularMatrix(
            self,
            dim,
            {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
        )

    def _project(self, dim: int, Q_ZZ: Tensor, Q_off: Tensor, q_C: Tensor) -> RankTriangularMatrix:
        r""":math:`\hat\Pi(Q)` from pieces of a symmetric :math:`Q` (``Q_off`` is
        :math:`Q_{\mathcal Z\mathcal C}` or :math:`Q_{\mathcal C\mathcal Z}`, as stored)."""
        return self._matrix(dim, self.project_triangle(Q_ZZ), 2 * Q_off, q_C)

    def from_dense(self, sym: Tensor) -> RankTriangularMatrix:
        d = sym.shape[0]
        S_ZZ, S_ZC, S_CZ, S_CC = _arrow.split_blocks(sym, *self.sizes(d))
        off = S_ZC + S_CZ.T if self.dense_rows else S_CZ + S_ZC.T
        return self._matrix(d, self.project_triangle(S_ZZ), off, S_CC.diagonal())

    def from_mat_inner(self, X: Tensor) -> RankTriangularMatrix:
        d = X.shape[0]
        M_ZZ, M_ZC, m_C = _arrow.gram_pieces(X, *self.sizes(d))
        return self._project(d, M_ZZ, M_ZC if self.dense_rows else M_ZC.T, m_C)

    def zeros(self, dim, *, dtype=None, device=None) -> RankTriangularMatrix:
        k = sum(self.sizes(dim))
        c = dim - k
        kwargs = {"dtype": dtype, "device": device}
        off = torch.zeros((k, c) if self.dense_rows else (c, k), **kwargs)
        return self._matrix(dim, torch.zeros(k, k, **kwargs), off, torch.zeros(c, **kwargs))


@dataclasses.dataclass(frozen=True)
class TrilTopLeft(RankTriangular):
    """``[[D, 0], [B, L]]``: lower, last ``rank`` rows dense (``"tril_top_left(k)"``)."""

    name = "tril_top_left"
    lower = True
    dense_rows = True


@dataclasses.dataclass(frozen=True)
class TrilBottomRight(RankTriangular):
    """``[[L, 0], [B, D]]``: lower, first ``rank`` columns dense (``"tril_bottom_right(k)"``)."""

    name = "tril_bottom_right"
    lower = True
    dense_rows = False


@dataclasses.dataclass(frozen=True)
class TriuTopLeft(RankTriangular):
    """``[[D, B], [0, U]]``: upper, last ``rank`` columns dense (``"triu_top_left(k)"``)."""

    name = "triu_top_left"
    lower = False
    dense_rows = False


@dataclasses.dataclass(frozen=True)
class TriuBottomRight(RankTriangular):
    """``[[U, B], [0, D]]``: upper, first ``rank`` rows dense (``"triu_bottom_right(k)"``)."""

    name = "triu_bottom_right"
    lower = False
    dense_rows = True


class RankTriangularMatrix(StructuredMatrix):
    r"""A rank-k triangular matrix stored as ``tri``, ``off`` and ``diag``.

    ``tri`` is the ``[k, k]`` triangle :math:`K_{\mathcal Z\mathcal Z}` (zeros outside),
    ``off`` the dense block (``[k, d-k]`` rows or ``[d-k, k]`` columns) and ``diag`` the
    diagonal of :math:`K_{\mathcal C\mathcal C}`.
    """

    structure: RankTriangular

    def _pieces(self) -> _arrow.Pieces:
        t = self._tensors
        return t["tri"], t["off"], t["diag"]

    def _slices(self) -> tuple[slice, slice]:
        r"""Index ranges of :math:`\mathcal Z` and :math:`\mathcal C` (both contiguous)."""
        a, e = self.structure.sizes(self.dim)
        if a:
            return slice(0, a), slice(a, self.dim)
        return slice(self.dim - e, self.dim), slice(0, self.dim - e)

    def to_dense(self) -> Tensor:
        tri, off, diag = self._pieces()
        Z, C = self._slices()
        out = tri.new_zeros(self.dim, self.dim)
        out[Z, Z] = tri
        if self.structure.dense_rows:
            out[Z, C] = off
        else:
            out[C, Z] = off
        out[C, C] = torch.diag(diag)
        return out

    def matmat(self, X: Tensor) -> Tensor:
        a, e = self.structure.sizes(self.dim)
        op = _arrow.row_matmat if self.structure.dense_rows else _arrow.column_matmat
        return op(*self._pieces(), X.to(self.dtype), a, e)

    def rmatmat(self, X: Tensor) -> Tensor:
        a, e = self.structure.sizes(self.dim)
        op = _arrow.row_rmatmat if self.structure.dense_rows else _arrow.column_rmatmat
        return op(*self._pieces(), X.to(self.dtype), a, e)

    def matmul(self, other: RankTriangularMatrix) -> RankTriangularMatrix:
        self._check_same(other)
        op = _arrow.row_matmul if self.structure.dense_rows else _arrow.column_matmul
        product = op(self._pieces(), other.to(self.dtype)._pieces())
        return self.structure._matrix(self.dim, *product)

    def from_inner(self, X: Tensor | None = None) -> RankTriangularMatrix:
        a, e = self.structure.sizes(self.dim)
        X = None if X is None else X.to(self.dtype)
        if self.structure.dense_rows:
            M = None if X is None else _arrow.gram_pieces(X, a, e)
            Q = _arrow.row_inner(*self._pieces(), M)
        else:
            Q = _arrow.column_inner(*self._pieces(), X, a, e)
        return self.structure._project(self.dim, *Q)

    def diagonal(self) -> Tensor:
        tri, _, diag = self._pieces()
        a, _ = self.structure.sizes(self.dim)
        parts = [tri.diagonal(), diag] if a else [diag, tri.diagonal()]
        return torch.cat(parts)

    def diag_add_(self, value: float | Tensor) -> RankTriangularMatrix:
        tri, _, diag = self._pieces()
        tri.diagonal().add_(value)
        diag.add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        return self._stored_frobenius_norm()


RankTriangular.matrix_cls = RankTriangularMatrix
