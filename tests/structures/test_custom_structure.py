"""A user-defined structure plugs into SINGD by registration alone (no optimizer changes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

import singd
from singd.structures import (
    Structure,
    StructuredMatrix,
    parse_structure,
    register_structure,
    scoped_registration,
)


@dataclasses.dataclass(frozen=True)
class ScaledIdentity(Structure):
    r"""Multiples of the identity :math:`sI` (a group for :math:`s \ne 0`).

    Every diagonal entry is tied to one parameter, so :math:`\hat\Pi(S) =
    \operatorname{Tr}(S)/d \cdot I` (spec §3.3: ties are averaged).
    """

    name = "scaled_identity_test"

    def from_dense(self, sym: Tensor) -> ScaledIdentityMatrix:
        return ScaledIdentityMatrix(self, sym.shape[0], {"scale": sym.diagonal().mean().reshape(1)})

    def from_mat_inner(self, X: Tensor) -> ScaledIdentityMatrix:
        return ScaledIdentityMatrix(
            self, X.shape[0], {"scale": X.square().sum().reshape(1) / X.shape[0]}
        )

    def zeros(self, dim, *, dtype=None, device=None) -> ScaledIdentityMatrix:
        return ScaledIdentityMatrix(
            self, dim, {"scale": torch.zeros(1, dtype=dtype, device=device)}
        )


class ScaledIdentityMatrix(StructuredMatrix):
    @property
    def scale(self) -> Tensor:
        return self._tensors["scale"]

    def to_dense(self) -> Tensor:
        return self.scale * torch.eye(self.dim, dtype=self.dtype, device=self.device)

    def matmat(self, X: Tensor) -> Tensor:
        return self.scale * X

    rmatmat = matmat

    def matmul(self, other: ScaledIdentityMatrix) -> ScaledIdentityMatrix:
        return self._like({"scale": self.scale * other.scale})

    def from_inner(self, X: Tensor | None = None) -> ScaledIdentityMatrix:
        if X is None:
            return self._like({"scale": self.scale.square()})
        return self.structure.from_mat_inner(self.matmat(X))

    def diagonal(self) -> Tensor:
        return self.scale.expand(self.dim).clone()

    def diag_add_(self, value: float | Tensor) -> ScaledIdentityMatrix:
        self.scale.add_(value)
        return self


ScaledIdentity.matrix_cls = ScaledIdentityMatrix


def test_registered_structure_trains_with_singd():
    register_structure(ScaledIdentity)  # (undone after the test: tests/conftest.py)
    assert parse_structure("scaled_identity_test") == ScaledIdentity()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    before = [p.detach().clone() for p in model.parameters()]
    optim = singd.SINGD(model, lr=0.1, T=1, structures=("scaled_identity_test", "dense"))
    for _ in range(3):
        optim.zero_grad()
        X, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        nn.functional.cross_entropy(model(X), y).backward()
        optim.step()

    K = optim.factors("0").K
    assert isinstance(K, ScaledIdentityMatrix)
    assert not torch.equal(K.scale, torch.ones(1))  # the factor was updated
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, p0)


def test_scoped_registration_removes_the_structure_again():
    with scoped_registration():
        register_structure(ScaledIdentity)
        assert parse_structure("scaled_identity_test") == ScaledIdentity()
    with pytest.raises(ValueError, match="Unknown structure 'scaled_identity_test'"):
        parse_structure("scaled_identity_test")
