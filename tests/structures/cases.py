"""Shared cases of the structure tests: the specs, the sizes, random inputs, comparisons."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from singd.structures import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Hierarchical,
    Structure,
    StructuredMatrix,
    TrilBottomRight,
    TrilToeplitz,
    TrilTopLeft,
    TriuBottomRight,
    TriuToeplitz,
    TriuTopLeft,
)
from tests.structures.dense_reference import project
from tests.tolerances import assert_close

RANK_TRIANGULAR = (TrilTopLeft, TrilBottomRight, TriuTopLeft, TriuBottomRight)

#: Every registered structure class, with sizes around its edge cases.
SPECS: list[Structure] = [
    Dense(),
    Diagonal(),
    BlockDiagonal(1),
    BlockDiagonal(3),
    BlockDiagonal(30),
    Hierarchical(3, 2),
    Hierarchical(15, 15),
    Hierarchical(0, 3),
    TrilToeplitz(),
    TriuToeplitz(),
    *[cls(rank) for cls in RANK_TRIANGULAR for rank in (1, 2, 3)],
]

#: 1 and 2; smaller than a block (b = 3, 30); not a multiple of the block (5, 17, 64);
#: a multiple (30); d ≤ k1, k1 < d ≤ k1 + k2 and d > k1 + k2 for both (3, 2) and
#: (15, 15); d ≤ rank; Toeplitz runs each size through both of its routes (ROUTES).
DIMS = [1, 2, 5, 17, 30, 64]

DTYPES = [torch.float32, torch.float64, torch.bfloat16]

#: Structures with more than one code path by size: every case runs each path, the
#: large-``d`` one forced by zeroing its thresholds (module attribute, value pairs).
_TOEPLITZ_FFT = (
    ("singd.structures.toeplitz.DIRECT_MAX_DIM", 0),
    ("singd.structures.toeplitz.FFT_UNIT_COST", 0.0),
    # at these sizes the directly summed last lags would cover (almost) every lag
    ("singd.structures.toeplitz.EXACT_LAGS", 2),
)
ROUTES: dict[str, dict[str, tuple[tuple[str, float], ...] | None]] = {
    "tril_toeplitz": {"direct": None, "fft": _TOEPLITZ_FFT},
    "triu_toeplitz": {"direct": None, "fft": _TOEPLITZ_FFT},
}


def routes(spec: Structure) -> dict[str, tuple[tuple[str, float], ...] | None]:
    """The code paths of ``spec`` to test (``{"default": None}`` for one path)."""
    return ROUTES.get(spec.name, {"default": None})


def generator(*key: object) -> torch.Generator:
    """A generator seeded by the test case, so every case has its own fixed inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_symmetric(d: int, gen: torch.Generator) -> Tensor:
    S = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return (S + S.T) / 2


def random_structured(
    spec: Structure, d: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[StructuredMatrix, Tensor]:
    """A non-symmetric matrix in ``spec`` (in ``dtype``) and its float64 dense value.

    The dense value is the oracle projection of a random *non-symmetric* matrix: it
    has the pattern (ties included) but no symmetry, like the factors SINGD reaches
    (spec §9 A2). ``from_dense`` is the identity on such a matrix (tested).
    """
    R = project(spec, torch.randn(d, d, generator=gen, dtype=torch.float64))
    K = spec.from_dense(R).to(dtype)
    return K, R.to(dtype).to(torch.float64)


def random_columns(d: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """``X`` ``[d, n]`` scaled like SINGD's statistics (``1/√n``), given as ``Aᵀ``.

    SINGD passes :math:`X = A^\\top` of a row-major ``A``; the same layout here.
    """
    A = torch.randn(n, d, generator=gen, dtype=torch.float64) / n**0.5
    return A.to(dtype).T


def assert_close_scaled(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype,
    msg: str = "",
    tol: tuple[float, float] | None = None,
) -> None:
    """Compare relative to the largest expected entry (at least 1), in ``dtype``'s tolerance.

    Round-off of sums of products is bounded by the magnitude of the *operands*
    (:math:`|A||B|\\varepsilon`), not of each result entry, so entries that cancel to
    near zero are judged against the scale of the result, not their own size.
    """
    scale = expected.abs().max().clamp(min=1.0) if expected.numel() else 1.0
    assert_close(actual.to(torch.float64) / scale, expected / scale, dtype, msg, tol)


def check_stored(M: StructuredMatrix, spec: Structure, d: int, dtype: torch.dtype) -> None:
    """``M`` is a ``spec`` matrix of size ``d``, stored contiguous and in ``dtype``."""
    assert isinstance(M, spec.matrix_cls)
    assert M.structure == spec and M.dim == d and M.shape == (d, d)
    for name, t in M.tensors().items():
        assert t.dtype == dtype, (name, t.dtype)
        assert t.is_contiguous(), name
