r"""Dense oracle for the structures: each pattern as a mask of tie labels, and Π̂ from it.

Written from the spec (§3.3–§3.9 and the pattern tables in the structure modules),
**not** from the fast code: a pattern is a ``[d, d]`` integer matrix of *labels*,
``-1`` where the entry is fixed to zero, otherwise the id of the parameter the entry
holds (entries with equal labels are tied, e.g. a Toeplitz diagonal). The projection
is the general rule of spec §3.3,

.. math::
    \theta_p = \operatorname{mean}_{(i,j)\in T_p}
        \bigl(S_{ij} + [i\ne j \wedge (j,i)\notin P]\,S_{ji}\bigr),

evaluated with masks and a scatter-mean. On a matrix that already has the pattern
(symmetric or not) it is the identity, which is how the tests check that a result
"is in the structure".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from singd.structures import Structure


def _grid(d: int) -> tuple[Tensor, Tensor]:
    i = torch.arange(d)
    return i.unsqueeze(1).expand(d, d), i.unsqueeze(0).expand(d, d)


def _free(mask: Tensor) -> Tensor:
    """Labels for a pattern without ties: every free entry is its own parameter."""
    d = mask.shape[0]
    return torch.where(mask, torch.arange(d * d).view(d, d), -1)


def _dense(spec: Structure, d: int) -> Tensor:
    return _free(torch.ones(d, d, dtype=torch.bool))


def _diagonal(spec: Structure, d: int) -> Tensor:
    i, j = _grid(d)
    return _free(i == j)


def _block_diagonal(spec: Structure, d: int) -> Tensor:
    i, j = _grid(d)
    b = spec.block_size
    return _free(i // b == j // b)


def _hierarchical(spec: Structure, d: int) -> Tensor:
    """[[A, B1, B2], [0, diag C, 0], [0, D, E]] with A of size min(k1, d), E of min(k2, rest)."""
    i, j = _grid(d)
    a = min(spec.k1, d)
    e = min(spec.k2, d - a)
    middle_end = d - e
    top = i < a  # the A and B rows: dense
    middle = (i >= a) & (i < middle_end)  # the C rows: diagonal only
    bottom = i >= middle_end  # the D and E rows: no A columns
    return _free(top | (middle & (i == j)) | (bottom & (j >= a)))


def _toeplitz(lower: bool) -> Callable[[Structure, int], Tensor]:
    def labels(spec: Structure, d: int) -> Tensor:
        i, j = _grid(d)
        lag = i - j if lower else j - i
        return torch.where(lag >= 0, lag, -1)

    return labels


def _rank_triangular(lower: bool, dense_rows: bool, at_start: bool):
    """Diagonal plus ``rank`` dense rows (or columns), at the start or the end, in a triangle."""

    def labels(spec: Structure, d: int) -> Tensor:
        i, j = _grid(d)
        k = spec.rank
        triangle = i > j if lower else i < j
        index = i if dense_rows else j
        chosen = index < k if at_start else index >= d - k
        return _free((i == j) | (triangle & chosen))

    return labels


#: Pattern (labels) of every registered structure, by name.
PATTERNS: dict[str, Callable[[Structure, int], Tensor]] = {
    "dense": _dense,
    "diagonal": _diagonal,
    "block_diagonal": _block_diagonal,
    "hierarchical": _hierarchical,
    "tril_toeplitz": _toeplitz(lower=True),
    "triu_toeplitz": _toeplitz(lower=False),
    # [[D, 0], [B, L]]: last k rows
    "tril_top_left": _rank_triangular(lower=True, dense_rows=True, at_start=False),
    # [[L, 0], [B, D]]: first k columns
    "tril_bottom_right": _rank_triangular(lower=True, dense_rows=False, at_start=True),
    # [[D, B], [0, U]]: last k columns
    "triu_top_left": _rank_triangular(lower=False, dense_rows=False, at_start=False),
    # [[U, B], [0, D]]: first k rows
    "triu_bottom_right": _rank_triangular(lower=False, dense_rows=True, at_start=True),
}


def labels(spec: Structure, d: int) -> Tensor:
    """The ``[d, d]`` tie labels of ``spec`` (``-1``: entry fixed to zero)."""
    return PATTERNS[spec.name](spec, d)


def project(spec: Structure, S: Tensor) -> Tensor:
    """:math:`\\hat\\Pi(S)` as a dense matrix, by the rule of the module docstring."""
    d = S.shape[0]
    lab = labels(spec, d).to(S.device)
    free = lab >= 0
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=S.device)
    absorbs_mirror = free & off_diagonal & ~free.T
    values = S + torch.where(absorbs_mirror, S.T, torch.zeros_like(S))
    ids = lab[free]
    sums = torch.zeros(d * d, dtype=S.dtype, device=S.device).index_add_(0, ids, values[free])
    counts = torch.zeros(d * d, dtype=S.dtype, device=S.device).index_add_(
        0, ids, torch.ones_like(values[free])
    )
    out = torch.zeros_like(S)
    out[free] = sums[ids] / counts[ids]
    return out


def flip(spec_name: str) -> str:
    """The pattern :math:`J P J` of a pattern :math:`P` (rows and columns reversed)."""
    return {
        "tril_toeplitz": "triu_toeplitz",
        "triu_toeplitz": "tril_toeplitz",
        "tril_top_left": "triu_bottom_right",
        "triu_bottom_right": "tril_top_left",
        "tril_bottom_right": "triu_top_left",
        "triu_top_left": "tril_bottom_right",
    }[spec_name]
