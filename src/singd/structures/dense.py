r"""Dense factors: the unstructured group GL(d) (INGD = SINGD-dense).

Storage: the full ``[d, d]`` matrix. Projection :math:`\hat\Pi` is the identity.

Cost of :math:`\hat\Pi(K^\top X X^\top K)` for ``X`` of shape ``[d, n]``: the plain
route :math:`S = K^\top X,\ S S^\top` takes :math:`d^2 n + \tfrac12 d^2 n`
multiply-adds (the Gram matrix is symmetric, so only its lower half is computed, see
:func:`singd.structures._linalg.symmetric_gram`). With many columns,
:math:`K^\top (X X^\top) K` is cheaper: :math:`\tfrac12 d^2 n + 2 d^3`, i.e. whenever
:math:`n > 2d` (typical: ``n`` counts samples times convolution positions).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from singd.structures import _linalg
from singd.structures._linalg import symmetric_gram, symmetrized
from singd.structures.base import Structure, StructuredMatrix


@dataclasses.dataclass(frozen=True)
class Dense(Structure):
    """Unstructured ``d × d`` factors (``"dense"``)."""

    name = "dense"

    def from_dense(self, sym: Tensor) -> DenseMatrix:
        return DenseMatrix(
            self, sym.shape[0], {"mat": sym.clone(memory_format=torch.contiguous_format)}
        )

    def from_mat_inner(self, X: Tensor) -> DenseMatrix:
        return DenseMatrix(self, X.shape[0], {"mat": symmetric_gram(X)})

    def zeros(self, dim, *, dtype=None, device=None) -> DenseMatrix:
        return DenseMatrix(self, dim, {"mat": torch.zeros(dim, dim, dtype=dtype, device=device)})


class DenseMatrix(StructuredMatrix):
    """A dense matrix behind the structured interface."""

    @property
    def mat(self) -> Tensor:
        """The ``[d, d]`` matrix."""
        return self._tensors["mat"]

    def to_dense(self) -> Tensor:
        return self.mat

    def matmat(self, X: Tensor) -> Tensor:
        return self.mat @ X.to(self.dtype)

    def rmatmat(self, X: Tensor) -> Tensor:
        return self.mat.T @ X.to(self.dtype)

    def matmul(self, other: DenseMatrix) -> DenseMatrix:
        self._check_same(other)
        return self._like({"mat": self.mat @ other.mat.to(self.dtype)})

    def from_inner(self, X: Tensor | None = None) -> DenseMatrix:
        K = self.mat
        if X is None:
            if not _linalg.splits_work(K):  # one product, symmetrised (launch-bound)
                return self._like({"mat": symmetrized(K.mT @ K)})
            return self._like({"mat": symmetric_gram(K.T)})
        X = X.to(self.dtype)
        d, n = X.shape
        if n > 2 * d:  # K^T (X X^T) K: fewer multiply-adds for many columns (module doc)
            if not _linalg.splits_work(X):
                # accelerators are launch-bound: plain products, symmetrised once
                return self._like({"mat": symmetrized(K.T @ ((X @ X.T) @ K))})
            H = K.T @ (symmetric_gram(X) @ K)
            return self._like({"mat": H.tril() + H.tril(-1).T})
        return self._like({"mat": symmetric_gram(K.T @ X)})

    def diagonal(self) -> Tensor:
        return self.mat.diagonal().clone()

    def average_trace(self) -> Tensor:
        if self.dtype in (torch.float16, torch.bfloat16):  # divide first: no overflow
            return super().average_trace()
        return torch.trace(self.mat) / self.dim  # two operations instead of four

    def diag_add_(self, value: float | Tensor) -> DenseMatrix:
        self.mat.diagonal().add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self.mat)


Dense.matrix_cls = DenseMatrix
