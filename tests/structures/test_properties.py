"""Algebraic properties of every structure, on random sizes and inputs (hypothesis).

In float64: Π̂ is linear and idempotent (also on non-symmetric structured matrices),
the structure is closed under products, ``from_inner`` is Π̂ of ``Sᵀ S`` with
``S = Xᵀ K`` for any ``X``, and the upper patterns are the flips ``J·P·J`` of the
lower ones for every operation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from singd.structures import Structure, parse_structure
from tests.structures.cases import SPECS, random_structured, random_symmetric
from tests.structures.dense_reference import flip, project
from tests.tolerances import assert_close

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None, derandomize=True)

specs = st.sampled_from(SPECS)
dims = st.integers(min_value=1, max_value=40)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@FAST
@given(spec=specs, d=dims, seed=seeds, alpha=st.floats(-3, 3), beta=st.floats(-3, 3))
def test_projection_is_linear(spec: Structure, d: int, seed: int, alpha: float, beta: float):
    gen = _gen(seed)
    S1, S2 = random_symmetric(d, gen), random_symmetric(d, gen)
    combined = spec.from_dense(alpha * S1 + beta * S2).to_dense()
    separate = alpha * spec.from_dense(S1).to_dense() + beta * spec.from_dense(S2).to_dense()
    assert_close(combined, separate)


@FAST
@given(spec=specs, d=dims, seed=seeds)
def test_projection_is_idempotent(spec: Structure, d: int, seed: int):
    gen = _gen(seed)
    once = spec.from_dense(random_symmetric(d, gen)).to_dense()
    assert_close(spec.from_dense(once).to_dense(), once)
    # also on a non-symmetric member of the structure
    K, K_dense = random_structured(spec, d, F64, gen)
    assert_close(spec.from_dense(K.to_dense()).to_dense(), K_dense)


@FAST
@given(spec=specs, d=dims, seed=seeds)
def test_closed_under_products(spec: Structure, d: int, seed: int):
    gen = _gen(seed)
    (A, A_dense), (B, B_dense) = (
        random_structured(spec, d, F64, gen),
        random_structured(spec, d, F64, gen),
    )
    product = (A @ B).to_dense()
    assert_close(product, A_dense @ B_dense)
    assert_close(project(spec, product), product)  # the pattern (and ties) hold


@FAST
@given(spec=specs, d=dims, n=st.integers(1, 50), seed=seeds)
def test_from_inner_is_the_projected_gram_of_rmatmat(spec: Structure, d: int, n: int, seed: int):
    gen = _gen(seed)
    K, _ = random_structured(spec, d, F64, gen)
    X = torch.randn(d, n, generator=gen, dtype=F64)
    assert_close(K.from_inner(X).to_dense(), spec.from_mat_inner(K.rmatmat(X)).to_dense())
    # and Π̂(KᵀK) is the same with X = I
    assert_close(K.from_inner().to_dense(), K.from_inner(torch.eye(d, dtype=F64)).to_dense())


TRIANGULAR = [spec for spec in SPECS if spec.name.startswith(("tril", "triu"))]


@FAST
@given(spec=st.sampled_from(TRIANGULAR), d=dims, n=st.integers(1, 20), seed=seeds)
def test_upper_is_the_flip_of_lower(spec: Structure, d: int, n: int, seed: int):
    r"""``triu(M) = J·tril(J M J)·J`` for every operation (J: the exchange matrix)."""
    gen = _gen(seed)
    args = str(spec).removeprefix(spec.name)
    mirror = parse_structure(flip(spec.name) + args)

    def J(M: torch.Tensor) -> torch.Tensor:
        return M.flip(0) if M.ndim == 1 else M.flip((0, 1))

    S = random_symmetric(d, gen)
    assert_close(J(spec.from_dense(S).to_dense()), mirror.from_dense(J(S)).to_dense())

    K, K_dense = random_structured(spec, d, F64, gen)
    K_flip = mirror.from_dense(J(K_dense))  # J K J, a member of the mirrored pattern
    X = torch.randn(d, n, generator=gen, dtype=F64)
    assert_close(J(K_flip.to_dense()), K_dense)
    assert_close(K.matmat(X), K_flip.matmat(X.flip(0)).flip(0))
    assert_close(K.rmatmat(X), K_flip.rmatmat(X.flip(0)).flip(0))
    assert_close(J(K.from_inner(X).to_dense()), K_flip.from_inner(X.flip(0)).to_dense())
    assert_close(J(K.from_inner().to_dense()), K_flip.from_inner().to_dense())
    assert_close(J(K.diagonal()), K_flip.diagonal())
    assert_close(J(spec.from_mat_inner(X).to_dense()), mirror.from_mat_inner(X.flip(0)).to_dense())


@pytest.mark.parametrize("spec", TRIANGULAR, ids=str)
def test_flip_pairs_are_registered(spec):
    """Every triangular pattern has its mirrored partner registered (the flip duality)."""
    args = str(spec).removeprefix(spec.name)
    assert parse_structure(flip(spec.name) + args).name == flip(spec.name)
