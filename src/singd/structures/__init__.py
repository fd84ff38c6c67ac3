"""Structured matrices for SINGD's Kronecker factors, and their registry.

See :mod:`singd.structures.base` for the interface and the projection convention.

=========================  ==========================================  ===========================
canonical name             pattern                                     published alias
=========================  ==========================================  ===========================
``dense``                  unstructured                                ``dense``
``diagonal``               diagonal                                    ``diagonal``
``block_diagonal(b)``      square blocks of size b (last smaller)      ``block{b}diagonal``
``hierarchical(k1, k2)``   dense k1 top, k2 bottom rows; diag middle   ``hierarchical{k1}_{k2}``
``tril_toeplitz``          lower-triangular Toeplitz                   ``triltoeplitz``
``triu_toeplitz``          upper-triangular Toeplitz                   ``triutoeplitz``
``tril_top_left(k)``       diagonal + last k rows (lower)              ``triltopleftdiagonal``
``tril_bottom_right(k)``   diagonal + first k columns (lower)          ``trilbottomrightdiagonal``
``triu_top_left(k)``       diagonal + last k columns (upper)           ``triutopleftdiagonal``
``triu_bottom_right(k)``   diagonal + first k rows (upper)             ``triubottomrightdiagonal``
=========================  ==========================================  ===========================

The canonical name is ``str(spec)``; :func:`parse_structure` reads it back. The
rank-k aliases (published class names) mean ``k = 1``.
"""

import functools
import re

from singd.structures.base import NaiveImplementationWarning, Structure, StructuredMatrix
from singd.structures.block_diagonal import BlockDiagonal, BlockDiagonalMatrix
from singd.structures.dense import Dense, DenseMatrix
from singd.structures.diagonal import Diagonal, DiagonalMatrix
from singd.structures.hierarchical import Hierarchical, HierarchicalMatrix
from singd.structures.registry import (
    available_structures,
    parse_structure,
    register_alias,
    register_structure,
    scoped_registration,
)
from singd.structures.toeplitz import ToeplitzMatrix, TrilToeplitz, TriuToeplitz
from singd.structures.triangular import (
    RankTriangularMatrix,
    TrilBottomRight,
    TrilTopLeft,
    TriuBottomRight,
    TriuTopLeft,
)

for _spec in (
    Dense,
    Diagonal,
    BlockDiagonal,
    Hierarchical,
    TrilToeplitz,
    TriuToeplitz,
    TrilTopLeft,
    TrilBottomRight,
    TriuTopLeft,
    TriuBottomRight,
):
    register_structure(_spec)

# Names of the published implementation (f-dangel/singd).
register_alias(r"block(\d+)diagonal", lambda m: BlockDiagonal(int(m[1])), "block30diagonal")
register_alias(
    r"hierarchical(\d+)_(\d+)",
    lambda m: Hierarchical(int(m[1]), int(m[2])),
    "hierarchical15_15",
)
register_alias("triltoeplitz", lambda m: TrilToeplitz(), "triltoeplitz")
register_alias("triutoeplitz", lambda m: TriuToeplitz(), "triutoeplitz")


def _rank_one(cls: type[Structure], match: re.Match[str]) -> Structure:
    """The published rank-1 triangular names (``triltopleftdiagonal``, …)."""
    return cls(1)  # type: ignore[call-arg]


for _cls in (TrilTopLeft, TrilBottomRight, TriuTopLeft, TriuBottomRight):
    _alias = _cls.name.replace("_", "") + "diagonal"  # e.g. TrilTopLeftDiagonalMatrix
    register_alias(_alias, functools.partial(_rank_one, _cls), _alias)

__all__ = [
    "BlockDiagonal",
    "BlockDiagonalMatrix",
    "Dense",
    "DenseMatrix",
    "Diagonal",
    "DiagonalMatrix",
    "Hierarchical",
    "HierarchicalMatrix",
    "NaiveImplementationWarning",
    "RankTriangularMatrix",
    "Structure",
    "StructuredMatrix",
    "ToeplitzMatrix",
    "TrilBottomRight",
    "TrilToeplitz",
    "TrilTopLeft",
    "TriuBottomRight",
    "TriuToeplitz",
    "TriuTopLeft",
    "available_structures",
    "parse_structure",
    "register_alias",
    "register_structure",
    "scoped_registration",
]
