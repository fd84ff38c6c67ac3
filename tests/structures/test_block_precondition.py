"""The preconditioning of block-diagonal factors through the products of their blocks.

:func:`~singd.functional.natural_gradient` applies :math:`K K^\\top` as one block
product (:meth:`BlockDiagonalMatrix.outer`, the blocks :math:`K_i K_i^\\top` formed
first) instead of :math:`K (K^\\top \\cdot)`: checked against the dense float64
:math:`C C^\\top G K K^\\top` for sizes with and without full blocks and trailing
blocks, non-symmetric factors, and every dtype.
"""

from __future__ import annotations

import pytest
import torch

from singd.functional import natural_gradient
from singd.structures import BlockDiagonal
from tests.structures.cases import DTYPES, assert_close_scaled, generator, random_structured


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [7, 30, 31, 64, 97])
def test_outer_is_the_dense_product(d: int, dtype: torch.dtype) -> None:
    spec = BlockDiagonal(30)
    M, dense = random_structured(spec, d, dtype, generator("block-outer", d, str(dtype)))
    P = M.outer()
    assert P.structure == spec and P.dtype == dtype
    assert_close_scaled(P.to_dense(), dense @ dense.T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("d_K", "d_C"), [(28, 16), (145, 32), (61, 100), (90, 30)])
def test_natural_gradient_matches_the_dense_formula(d_K: int, d_C: int, dtype: torch.dtype):
    gen = generator("block-natural-gradient", d_K, d_C, str(dtype))
    spec = BlockDiagonal(30)
    K, K_dense = random_structured(spec, d_K, dtype, gen)
    C, C_dense = random_structured(spec, d_C, dtype, gen)
    G = torch.randn(d_C, d_K, generator=gen, dtype=torch.float64)
    got = natural_gradient(K, C, G.to(dtype))
    assert got.shape == (d_C, d_K) and got.dtype == dtype
    want = C_dense @ C_dense.T @ G.to(dtype).double() @ K_dense @ K_dense.T
    assert_close_scaled(got, want, dtype)
