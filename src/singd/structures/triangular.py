r"""Rank-k triangular factors: a diagonal plus :math:`k` dense rows or columns.

The published code has the four rank-1 patterns of spec §3.8 (``TrilTopLeftDiagonal``
etc., dense fallbacks, not registered). Here they come for any :math:`k \ge 1`, exact
and in :math:`O(kd)` memory and :math:`O(kdn)` time, under four names. The corner in the
name is where the *diagonal* block sits, as in the published class names;
:math:`D` is diagonal, :math:`L`/:math:`U` are dense :math:`k\times k` lower/upper
triangles, :math:`B` is dense:

========================  ==============================================  =============
name                      pattern                                         dense part
========================  ==============================================  =============
``tril_top_left(k)``      :math:`\begin{pmatrix} D&0\\ B&L\end{pmatrix}`  last rows
``tril_bottom_right(k)``  :math:`\begin{pmatrix} L&0\\ B&D\end{pmatrix}`  first columns
``triu_top_left(k)``      :math:`\begin{pmatrix} D&B\\ 0&U\end{pmatrix}`  last columns
``triu_bottom_right(k)``  :math:`\begin{pmatrix} U&B\\ 0&D\end{pmatrix}`  first rows
========================  ==============================================  =============

(:math:`D` has size :math:`d - k`; for :math:`d \le k` the matrix is a dense triangle.)
Each is a lower/upper triangular matrix whose strictly-triangular part has rank at
most :math:`k`; the published aliases ``"triltopleftdiagonal"`` etc. give :math:`k=1`.

**Group closure.** In the *lower frame* every pattern is block lower-triangular
:math:`K = \begin{pmatrix} P & 0 \\ B & Q\end{pmatrix}` where one of :math:`P, Q` is
diagonal and the other a dense lower triangle. Then

.. math::
    K_1 K_2 = \begin{pmatrix} P_1P_2 & 0 \\ B_1 P_2 + Q_1 B_2 & Q_1 Q_2\end{pmatrix}

stays in the pattern (diagonal·diagonal and triangle·triangle are closed). A dense
:math:`k\times k` corner would be closed too, but the name promises a triangular
matrix, so the corner is a triangle and the Lie algebra has the same pattern.

**Projection** (spec §3.3): :math:`P = \hat\Pi_P(S_{11})`, :math:`Q = \hat\Pi_Q(S_{22})`
(a diagonal copies the diagonal; a triangle takes :math:`S_{ij} + S_{ji}` below the
diagonal, i.e. doubles it, and copies the diagonal) and
:math:`B = S_{21} + S_{12}^\top` (:math:`2S_{21}` for symmetric :math:`S`).

**from_inner.** With :math:`S = K^\top X`, i.e. :math:`S_1 = P^\top X_1 + B^\top X_2`,
:math:`S_2 = Q^\top X_2`:
:math:`\hat\Pi(S S^\top) = \bigl(\hat\Pi_P(S_1S_1^\top),\ 2 S_2 S_1^\top,\
\hat\Pi_Q(S_2S_2^\top)\bigr)`, about :math:`2kdn` multiply-adds, where
:math:`\hat\Pi_D(YY^\top)` is the row sums of :math:`Y^2` and only
:math:`k\times k` Gram blocks are formed. :math:`\hat\Pi(K^\top K) = \bigl(\hat\Pi_P(P^\top P +
B^\top B),\ 2 Q^\top B,\ \hat\Pi_Q(Q^\top Q)\bigr)`.

**Orientation.** The upper patterns are the flips :math:`J\,\cdot\,J` of the lower ones
(``triu_bottom_right`` = :math:`J`\ ``tril_top_left``\ :math:`J`, ``triu_top_left`` =
:math:`J`\ ``tril_bottom_right``\ :math:`J`), stored in the lower frame, see
:mod:`singd.structures._orientation`: their stored tensors are those of :math:`JKJ`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from singd.structures._linalg import row_sum_of_squares
from singd.structures._orientation import flip_both, flip_rows
from singd.structures.base import Structure, StructuredMatrix, check_size


class _DiagonalBlock:
    """A diagonal block stored as its diagonal vector ``v``."""

    @staticmethod
    def dense(v: Tensor) -> Tensor:
        return torch.diag(v)

    @staticmethod
    def matmat(v: Tensor, X: Tensor) -> Tensor:
        return v.unsqueeze(1) * X

    rmatmat = matmat

    @staticmethod
    def right_mul(Y: Tensor, v: Tensor) -> Tensor:
        """``Y @ diag(v)``."""
        return Y * v

    @staticmethod
    def mul(v1: Tensor, v2: Tensor) -> Tensor:
        return v1 * v2

    @staticmethod
    def project(S: Tensor) -> Tensor:
        return S.diagonal().clone()

    @staticmethod
    def project_gram(Y: Tensor) -> Tensor:
        """:math:`\\hat\\Pi(Y Y^\\top)`: the row sums of :math:`Y^2`."""
        return row_sum_of_squares(Y)

    @staticmethod
    def project_inner(v: Tensor, B: Tensor) -> Tensor:
        """:math:`\\hat\\Pi(P^\\top P + B^\\top B)` for :math:`P = \\operatorname{diag}(v)`."""
        return v.square() + B.square().sum(0)

    @staticmethod
    def diagonal(v: Tensor) -> Tensor:
        """The diagonal as a view (for in-place updates)."""
        return v

    @staticmethod
    def zeros(size: int, **kwargs) -> Tensor:
        return torch.zeros(size, **kwargs)


class _TriangleBlock:
    """A dense lower triangle stored as a ``[k, k]`` matrix with zeros above the diagonal."""

    @staticmethod
    def dense(L: Tensor) -> Tensor:
        return L

    @staticmethod
    def matmat(L: Tensor, X: Tensor) -> Tensor:
        return L @ X

    @staticmethod
    def rmatmat(L: Tensor, X: Tensor) -> Tensor:
        return L.T @ X

    @staticmethod
    def right_mul(Y: Tensor, L: Tensor) -> Tensor:
        return Y @ L

    @staticmethod
    def mul(L1: Tensor, L2: Tensor) -> Tensor:
        return L1 @ L2

    @staticmethod
    def project(S: Tensor) -> Tensor:
        """:math:`S_{ij} + S_{ji}` below the diagonal, :math:`S_{ii}` on it."""
        return (S + S.T).tril(-1) + torch.diag(S.diagonal())

    @classmethod
    def project_gram(cls, Y: Tensor) -> Tensor:
        return cls.project(Y @ Y.T)

    @classmethod
    def project_inner(cls, L: Tensor, B: Tensor) -> Tensor:
        return cls.project(L.T @ L + B.T @ B)

    @staticmethod
    def diagonal(L: Tensor) -> Tensor:
        return L.diagonal()

    @staticmethod
    def zeros(size: int, **kwargs) -> Tensor:
        return torch.zeros(size, size, **kwargs)


_Block = type[_DiagonalBlock] | type[_TriangleBlock]


@dataclasses.dataclass(frozen=True)
class RankTriangular(Structure):
    """Rank-k triangular factors (module docstring); the subclasses fix the pattern.

    Args:
        rank: :math:`k`, the number of dense rows or columns.
    """

    rank: int = 1
    #: Whether the matrix is lower triangular; upper ones are stored flipped.
    lower: ClassVar[bool]
    #: In the lower frame, whether the diagonal block is the top-left one (P).
    diagonal_first: ClassVar[bool]

    def __post_init__(self) -> None:
        check_size("rank", self.rank, minimum=1)

    def frame(self, dim: int) -> tuple[_Block, _Block, int]:
        """``(P, Q, p)``: kinds of the lower-frame diagonal blocks and the size of P."""
        k = min(self.rank, dim)
        if self.diagonal_first:
            return _DiagonalBlock, _TriangleBlock, dim - k
        return _TriangleBlock, _DiagonalBlock, k

    def _matrix(self, dim: int, P: Tensor, B: Tensor, Q: Tensor) -> RankTriangularMatrix:
        diag, tri = (P, Q) if self.diagonal_first else (Q, P)
        tensors = {"diag": diag, "tri": tri, "off": B}
        return RankTriangularMatrix(
            self,
            dim,
            {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
        )

    def from_dense(self, sym: Tensor) -> RankTriangularMatrix:
        d = sym.shape[0]
        P, Q, p = self.frame(d)
        S = sym if self.lower else flip_both(sym)
        return self._matrix(d, P.project(S[:p, :p]), S[p:, :p] + S[:p, p:].T, Q.project(S[p:, p:]))

    def from_mat_inner(self, X: Tensor) -> RankTriangularMatrix:
        d = X.shape[0]
        P, Q, p = self.frame(d)
        if not self.lower:
            X = flip_rows(X)
        X1, X2 = X[:p], X[p:]
        return self._matrix(d, P.project_gram(X1), 2 * (X2 @ X1.T), Q.project_gram(X2))

    def zeros(self, dim, *, dtype=None, device=None) -> RankTriangularMatrix:
        P, Q, p = self.frame(dim)
        kwargs = {"dtype": dtype, "device": device}
        q = dim - p
        return self._matrix(
            dim, P.zeros(p, **kwargs), torch.zeros(q, p, **kwargs), Q.zeros(q, **kwargs)
        )


@dataclasses.dataclass(frozen=True)
class TrilTopLeft(RankTriangular):
    """``[[D, 0], [B, L]]``: lower, last ``rank`` rows dense (``"tril_top_left(k)"``)."""

    name = "tril_top_left"
    lower = True
    diagonal_first = True


@dataclasses.dataclass(frozen=True)
class TrilBottomRight(RankTriangular):
    """``[[L, 0], [B, D]]``: lower, first ``rank`` columns dense (``"tril_bottom_right(k)"``)."""

    name = "tril_bottom_right"
    lower = True
    diagonal_first = False


@dataclasses.dataclass(frozen=True)
class TriuTopLeft(RankTriangular):
    """``[[D, B], [0, U]]``: upper, last ``rank`` columns dense (``"triu_top_left(k)"``)."""

    name = "triu_top_left"
    lower = False
    diagonal_first = False  # J·(tril_bottom_right)·J


@dataclasses.dataclass(frozen=True)
class TriuBottomRight(RankTriangular):
    """``[[U, B], [0, D]]``: upper, first ``rank`` rows dense (``"triu_bottom_right(k)"``)."""

    name = "triu_bottom_right"
    lower = False
    diagonal_first = True  # J·(tril_top_left)·J


class RankTriangularMatrix(StructuredMatrix):
    """A rank-k triangular matrix, stored in the lower frame as ``diag``, ``tri``, ``off``.

    ``diag`` is the diagonal block's diagonal, ``tri`` the ``[k, k]`` lower triangle and
    ``off`` the dense block ``B`` below them; upper patterns store those of :math:`JKJ`.
    """

    structure: RankTriangular

    def _frame(self) -> tuple[_Block, Tensor, Tensor, _Block, Tensor, int]:
        """``(P kind, P, B, Q kind, Q, p)`` of the lower frame."""
        t = self._tensors
        P, Q, p = self.structure.frame(self.dim)
        first, second = (
            (t["diag"], t["tri"]) if self.structure.diagonal_first else (t["tri"], t["diag"])
        )
        return P, first, t["off"], Q, second, p

    def _flip(self, X: Tensor) -> Tensor:
        return X if self.structure.lower else flip_rows(X)

    def to_dense(self) -> Tensor:
        P, P_t, B, Q, Q_t, p = self._frame()
        out = B.new_zeros(self.dim, self.dim)
        out[:p, :p] = P.dense(P_t)
        out[p:, :p] = B
        out[p:, p:] = Q.dense(Q_t)
        return out if self.structure.lower else flip_both(out)

    def matmat(self, X: Tensor) -> Tensor:
        P, P_t, B, Q, Q_t, p = self._frame()
        X = self._flip(X.to(self.dtype))
        X1, X2 = X[:p], X[p:]
        return self._flip(torch.cat([P.matmat(P_t, X1), B @ X1 + Q.matmat(Q_t, X2)]))

    def _frame_rmatmat(self, X: Tensor) -> Tensor:
        P, P_t, B, Q, Q_t, p = self._frame()
        X1, X2 = X[:p], X[p:]
        return torch.cat([P.rmatmat(P_t, X1) + B.T @ X2, Q.rmatmat(Q_t, X2)])

    def rmatmat(self, X: Tensor) -> Tensor:
        return self._flip(self._frame_rmatmat(self._flip(X.to(self.dtype))))

    def matmul(self, other: RankTriangularMatrix) -> RankTriangularMatrix:
        self._check_same(other)
        P, P1, B1, Q, Q1, _ = self._frame()
        _, P2, B2, _, Q2, _ = other.to(self.dtype)._frame()
        return self.structure._matrix(
            self.dim, P.mul(P1, P2), P.right_mul(B1, P2) + Q.matmat(Q1, B2), Q.mul(Q1, Q2)
        )

    def from_inner(self, X: Tensor | None = None) -> RankTriangularMatrix:
        P, P_t, B, Q, Q_t, p = self._frame()
        if X is None:
            return self.structure._matrix(
                self.dim,
                P.project_inner(P_t, B),
                2 * Q.rmatmat(Q_t, B),
                Q.project_inner(Q_t, B[:, :0].T),
            )
        S = self._frame_rmatmat(self._flip(X.to(self.dtype)))
        S1, S2 = S[:p], S[p:]
        return self.structure._matrix(
            self.dim, P.project_gram(S1), 2 * (S2 @ S1.T), Q.project_gram(S2)
        )

    def diagonal(self) -> Tensor:
        P, P_t, _, Q, Q_t, _ = self._frame()
        return self._flip(torch.cat([P.diagonal(P_t), Q.diagonal(Q_t)]))

    def diag_add_(self, value: float | Tensor) -> RankTriangularMatrix:
        P, P_t, _, Q, Q_t, _ = self._frame()
        P.diagonal(P_t).add_(value)
        Q.diagonal(Q_t).add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        return self._stored_frobenius_norm()


RankTriangular.matrix_cls = RankTriangularMatrix
