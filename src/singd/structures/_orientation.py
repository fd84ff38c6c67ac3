r"""Upper-triangular structures as flipped lower-triangular ones.

With the exchange matrix :math:`J` (ones on the anti-diagonal, :math:`J = J^\top = J^{-1}`),
conjugation :math:`M \mapsto J M J` reverses the order of rows and columns: entry
:math:`(i, j)` moves to :math:`(d-1-i, d-1-j)`. It maps lower-triangular matrices to
upper-triangular ones, keeps products (:math:`J A J \cdot J B J = J AB J`), the
diagonal (reversed), the trace and the norms, and commutes with the projection
:math:`\hat\Pi` (it permutes positions and their mirrors together). Hence one
implementation written for a lower pattern :math:`\mathcal L` serves the upper pattern
:math:`J \mathcal L J`: an upper matrix :math:`U` is stored as :math:`L = J U J`, and

.. math::
    U X = J\,(L\,(J X)), \qquad U^\top X = J\,(L^\top (J X)), \qquad
    \hat\Pi_U(U^\top X X^\top U) = J\,\hat\Pi_L\bigl(L^\top (JX)(JX)^\top L\bigr)\,J,

so the stored (lower-frame) result of ``from_inner`` is the lower ``from_inner`` of
:math:`J X`. :math:`J X` is ``X.flip(0)`` (a copy of ``X``, O(dn)).
"""

from __future__ import annotations

from torch import Tensor


def flip_rows(X: Tensor) -> Tensor:
    r""":math:`J X`: the rows of ``X`` (``[d]`` or ``[d, n]``) in reverse order."""
    return X.flip(0)


def flip_both(M: Tensor) -> Tensor:
    r""":math:`J M J` for a square ``M``: rows and columns in reverse order."""
    return M.flip((0, 1))
