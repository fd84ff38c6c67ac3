"""The preconditioning's :math:`M M^\\top X` in one pass (``outer_matmat``).

:func:`~singd.functional.natural_gradient` applies :math:`K K^\\top` of a block-diagonal
factor as one block product (:meth:`BlockDiagonalMatrix.outer`, the blocks
:math:`K_i K_i^\\top` formed first), and of a hierarchical one in one pass with the
small block of :math:`K K^\\top` (:func:`singd.structures._arrow.row_outer_matmat`),
instead of :math:`K (K^\\top \\cdot)`: checked against the dense float64 products for
sizes with and without full blocks, trailing blocks and a diagonal part, in place
and under ``torch.vmap`` (the stacked layers' route, out of place), non-symmetric
factors, and every dtype.
"""

from __future__ import annotations

import pytest
import torch

from singd.functional import natural_gradient
from singd.structures import BlockDiagonal, Hierarchical, Structure
from tests.structures.cases import (
    DTYPES,
    assert_close_scaled,
    generator,
    random_columns,
    random_structured,
)

SPECS = [BlockDiagonal(30), Hierarchical(15, 15), Hierarchical(0, 5), Hierarchical(5, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [7, 20, 30, 31, 64, 97])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_outer_matmat_is_the_dense_product(spec: Structure, d: int, dtype: torch.dtype) -> None:
    gen = generator("outer-matmat", str(spec), d, str(dtype))
    M, dense = random_structured(spec, d, dtype, gen)
    X = random_columns(d, 9, dtype, gen)  # (Aᵀ: a transposed layout, as SINGD's Gᵀ)
    want = dense @ dense.T @ X.double()
    got = M.outer_matmat(X)  # type: ignore[attr-defined]
    assert got.shape == (d, 9) and got.dtype == dtype
    assert_close_scaled(got, want, dtype)
    assert_close_scaled(M.outer_matmat(X.contiguous()), want, dtype)  # type: ignore[attr-defined]
    # under vmap (stacked equal layers): the out-of-place route
    stacked = torch.vmap(lambda x: M.outer_matmat(x))(torch.stack([X, 2 * X]))  # type: ignore[attr-defined]
    assert_close_scaled(stacked[1], 2 * want, dtype)
    if isinstance(spec, BlockDiagonal):
        P = M.outer()  # type: ignore[attr-defined]
        assert P.structure == spec and P.dtype == dtype
        assert_close_scaled(P.to_dense(), dense @ dense.T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("d_K", "d_C"), [(28, 16), (145, 32), (61, 100), (90, 30)])
@pytest.mark.parametrize("spec", SPECS[:2], ids=str)
def test_natural_gradient_matches_the_dense_formula(
    spec: Structure, d_K: int, d_C: int, dtype: torch.dtype
) -> None:
    gen = generator("outer-natural-gradient", str(spec), d_K, d_C, str(dtype))
    K, K_dense = random_structured(spec, d_K, dtype, gen)
    C, C_dense = random_structured(spec, d_C, dtype, gen)
    G = torch.randn(d_C, d_K, generator=gen, dtype=torch.float64)
    got = natural_gradient(K, C, G.to(dtype))
    assert got.shape == (d_C, d_K) and got.dtype == dtype
    want = C_dense @ C_dense.T @ G.to(dtype).double() @ K_dense @ K_dense.T
    assert_close_scaled(got, want, dtype)
