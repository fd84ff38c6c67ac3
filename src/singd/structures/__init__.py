"""Structured matrices for SINGD's Kronecker factors, and their registry.

See :mod:`singd.structures.base` for the interface and the projection convention.
"""

from singd.structures.base import NaiveImplementationWarning, Structure, StructuredMatrix
from singd.structures.dense import Dense, DenseMatrix
from singd.structures.diagonal import Diagonal, DiagonalMatrix
from singd.structures.registry import (
    available_structures,
    parse_structure,
    register_alias,
    register_structure,
)

register_structure(Dense)
register_structure(Diagonal)

__all__ = [
    "Dense",
    "DenseMatrix",
    "Diagonal",
    "DiagonalMatrix",
    "NaiveImplementationWarning",
    "Structure",
    "StructuredMatrix",
    "available_structures",
    "parse_structure",
    "register_alias",
    "register_structure",
]
