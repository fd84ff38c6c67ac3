"""The widened-window Gram products of block-diagonal factors (``block_grams``).

Every block width around a register tile, every count of windows (none, some, all),
both layouts SINGD passes (``Aᵀ`` of a row-major ``A``, and a contiguous ``Aᵀ``), a view
that starts inside its storage, and every dtype, against the Gram matrices of the
blocks formed from an explicit copy in float64.
"""

from __future__ import annotations

import pytest
import torch

from singd.structures.block_diagonal import MAX_GRAM_WIDENING, block_grams
from tests.structures.cases import DTYPES, generator, random_columns
from tests.tolerances import assert_close

N_COLUMNS = 37


def _oracle(X: torch.Tensor, N: int, b: int) -> torch.Tensor:
    blocks = X[: N * b].double().reshape(N, b, X.shape[1])
    return blocks @ blocks.mT


@pytest.mark.parametrize("layout", ["A-row-major", "A-T-contiguous", "offset-view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("b", "d"),
    [
        (30, 29),  # no full block
        (30, 31),  # one block, no room for a 32-row window: plain product
        (30, 61),  # two blocks, one window (the second would run past d)
        (30, 62),  # two windows exactly
        (30, 97),  # three windows and a trailing block
        (28, 150),  # widened by the maximum
        (12, 50),  # float32 tile 16: widened by 4
        (3, 20),  # too far from a tile: plain products
        (16, 40),  # a tile multiple: plain products
        (31, 95),
    ],
)
def test_block_grams_match_the_blocks(b: int, d: int, dtype: torch.dtype, layout: str):
    gen = generator("block-grams", b, d, str(dtype), layout)
    X = random_columns(d + 3, N_COLUMNS, dtype, gen)
    # rows 3.. of a larger matrix (a view that starts inside its storage) or all of one
    X = X[3:] if layout == "offset-view" else X[:d]
    X = X.contiguous() if layout == "A-T-contiguous" else X
    N = d // b
    got = block_grams(X, N, b)
    assert got.shape == (N, b, b) and got.dtype == dtype
    assert_close(got, _oracle(X, N, b), dtype)


def test_widening_rule():
    """The published default b = 30 is widened (to 32 float32 numbers); b = 20 is not."""
    assert 32 - 30 <= MAX_GRAM_WIDENING < 32 - 20
