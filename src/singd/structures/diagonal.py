r"""Diagonal factors (``"diagonal"``): the group of invertible diagonal matrices.

Storage: the ``d`` diagonal entries. :math:`\hat\Pi(S) = \operatorname{Diag}(S)`.
:math:`\hat\Pi(K^\top X X^\top K)` is :math:`k^2 \odot \operatorname{rowsum}(X \circ X)`,
O(dn) — the same memory as AdamW's second moment per factor.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from singd.structures._linalg import row_sum_of_squares
from singd.structures.base import Structure, StructuredMatrix


@dataclasses.dataclass(frozen=True)
class Diagonal(Structure):
    """Diagonal factors (``"diagonal"``)."""

    name = "diagonal"

    def from_dense(self, sym: Tensor) -> DiagonalMatrix:
        return DiagonalMatrix(self, sym.shape[0], {"diag": sym.diagonal().clone()})

    def from_mat_inner(self, X: Tensor) -> DiagonalMatrix:
        return DiagonalMatrix(self, X.shape[0], {"diag": row_sum_of_squares(X)})

    def zeros(self, dim, *, dtype=None, device=None) -> DiagonalMatrix:
        return DiagonalMatrix(self, dim, {"diag": torch.zeros(dim, dtype=dtype, device=device)})


class DiagonalMatrix(StructuredMatrix):
    """A diagonal matrix stored as its diagonal."""

    @property
    def diag(self) -> Tensor:
        """The ``[d]`` diagonal."""
        return self._tensors["diag"]

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    def matmat(self, X: Tensor) -> Tensor:
        return self.diag.unsqueeze(-1) * X

    rmatmat = matmat

    def matmul(self, other: DiagonalMatrix) -> DiagonalMatrix:
        self._check_same(other)
        return self._like({"diag": self.diag * other.diag.to(self.dtype)})

    def from_inner(self, X: Tensor | None = None) -> DiagonalMatrix:
        if X is None:
            return self._like({"diag": self.diag**2})
        # k² ⊙ rowsum(X∘X): K X is never formed
        return self._like({"diag": self.diag.square() * row_sum_of_squares(X.to(self.dtype))})

    inner_needs_only_diagonal = True

    def from_inner_diagonal(self, diag: Tensor) -> DiagonalMatrix:
        return self._like({"diag": self.diag.square() * diag.to(self.dtype)})

    def diagonal(self) -> Tensor:
        return self.diag.clone()

    def trace(self) -> Tensor:
        return self.diag.sum()  # the base class's, without copying the diagonal first

    def average_trace(self) -> Tensor:
        return (self.diag / self.dim).sum()

    def diag_add_(self, value: float | Tensor) -> DiagonalMatrix:
        self.diag.add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.diag)


Diagonal.matrix_cls = DiagonalMatrix
