r"""Dense factors: the unstructured group GL(d) (INGD = SINGD-dense).

Storage: the full ``[d, d]`` matrix. Projection :math:`\hat\Pi` is the identity.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from singd.structures.base import Structure, StructuredMatrix


@dataclasses.dataclass(frozen=True)
class Dense(Structure):
    """Unstructured ``d × d`` factors (``"dense"``)."""

    name = "dense"

    def from_dense(self, sym: Tensor) -> DenseMatrix:
        return DenseMatrix(self, sym.shape[0], {"mat": sym.clone().contiguous()})

    def from_mat_inner(self, X: Tensor) -> DenseMatrix:
        return DenseMatrix(self, X.shape[0], {"mat": X @ X.T})

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
        return self.mat @ X

    def rmatmat(self, X: Tensor) -> Tensor:
        return self.mat.T @ X

    def matmul(self, other: DenseMatrix) -> DenseMatrix:
        self._check_same(other)
        return self._like({"mat": self.mat @ other.mat})

    def from_inner(self, X: Tensor | None = None) -> DenseMatrix:
        S = self.mat if X is None else self.rmatmat(X)
        return self._like({"mat": S.T @ S if X is None else S @ S.T})

    def diagonal(self) -> Tensor:
        return self.mat.diagonal().clone()

    def diag_add_(self, value: float | Tensor) -> DenseMatrix:
        self.mat.diagonal().add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self.mat)


Dense.matrix_cls = DenseMatrix
