r"""Arrow matrices: the shared core of the hierarchical and rank-k triangular structures.

Split the indices into a small *dense* set :math:`\mathcal Z = [0, a) \cup [d-e, d)`
(:math:`z = a + e` indices) and the *diagonal* set :math:`\mathcal C = [a, d-e)`
(:math:`c` indices). An arrow matrix has a small block :math:`K_{\mathcal Z\mathcal Z}`,
a diagonal :math:`K_{\mathcal C\mathcal C} = \operatorname{diag}(C)`, and one dense
off-diagonal block:

* a **row arrow** has dense rows: :math:`W = K_{\mathcal Z\mathcal C}`
  (:math:`z\times c`) and :math:`K_{\mathcal C\mathcal Z} = 0`;
* a **column arrow** has dense columns: :math:`V = K_{\mathcal C\mathcal Z}`
  (:math:`c\times z`) and :math:`K_{\mathcal Z\mathcal C} = 0`.

Both are closed under products whenever the pattern of :math:`K_{\mathcal Z\mathcal Z}`
is (a triangle, a block triangle):

.. math::
    \text{row: } (K_{\mathcal Z\mathcal Z}^{(1)} K_{\mathcal Z\mathcal Z}^{(2)},\;
        K_{\mathcal Z\mathcal Z}^{(1)} W_2 + W_1 \operatorname{diag}(C_2),\; C_1 C_2), \quad
    \text{column: } (K_{\mathcal Z\mathcal Z}^{(1)} K_{\mathcal Z\mathcal Z}^{(2)},\;
        V_1 K_{\mathcal Z\mathcal Z}^{(2)} + \operatorname{diag}(C_1) V_2,\; C_1 C_2).

**Projection.** The off-diagonal block's mirror is off pattern, so it absorbs it
(:math:`W = Q_{\mathcal Z\mathcal C} + Q_{\mathcal C\mathcal Z}^\top`, i.e.
:math:`2Q_{\mathcal Z\mathcal C}` for symmetric :math:`Q`), the diagonal copies
:math:`\operatorname{diag} Q_{\mathcal C\mathcal C}`, and the small block follows the
rule of spec §3.3 with its own mask (:func:`project_masked`).

**from_inner**, :math:`\hat\Pi(K^\top M K)` with :math:`M = X X^\top` (never formed):

* row arrow: only :math:`M_{\mathcal Z\mathcal Z}`, :math:`M_{\mathcal Z\mathcal C}` and
  :math:`m_C = \operatorname{diag} M_{\mathcal C\mathcal C}` are needed
  (:math:`X_{\mathcal Z} X^\top`, :math:`z d n` multiply-adds, and row norms):

  .. math::
      T = M_{\mathcal Z\mathcal Z} W + M_{\mathcal Z\mathcal C}\operatorname{diag}(C), \quad
      Q_{\mathcal Z\mathcal Z} = K_{\mathcal Z\mathcal Z}^\top M_{\mathcal Z\mathcal Z}
          K_{\mathcal Z\mathcal Z}, \quad
      Q_{\mathcal Z\mathcal C} = K_{\mathcal Z\mathcal Z}^\top T, \\
      \operatorname{diag} Q_{\mathcal C\mathcal C} = \operatorname{colsum}(W \odot T)
          + C \odot \operatorname{colsum}(W \odot M_{\mathcal Z\mathcal C}) + C^2 \odot m_C;

* column arrow: the small rows :math:`S_{\mathcal Z} = K_{\mathcal Z\mathcal Z}^\top
  X_{\mathcal Z} + V^\top X_{\mathcal C}` of :math:`S = K^\top X` (the other rows are
  :math:`\operatorname{diag}(C) X_{\mathcal C}`), then
  :math:`Q_{\mathcal Z\mathcal Z} = S_{\mathcal Z} S_{\mathcal Z}^\top`,
  :math:`Q_{\mathcal C\mathcal Z} = \operatorname{diag}(C)\, X_{\mathcal C}
  S_{\mathcal Z}^\top`, :math:`\operatorname{diag} Q_{\mathcal C\mathcal C} = C^2 \odot
  m_C`: :math:`2 z d n` multiply-adds.

Neither allocates anything of size ``d × d`` or ``d × n`` beyond ``z × n``; the
:math:`\hat\Pi(K^\top K)` forms are the same with :math:`M = I`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures import _linalg
from singd.structures._linalg import row_sum_of_squares

Pieces = tuple[Tensor, Tensor, Tensor]


def split_rows(X: Tensor, a: int, e: int) -> tuple[Tensor, Tensor]:
    r""":math:`(X_{\mathcal Z}, X_{\mathcal C})`: the dense rows, the diagonal rows.

    Views, except :math:`X_{\mathcal Z}` when :math:`\mathcal Z` has two parts (a copy).
    """
    d = X.shape[0]
    if a + e == d:  # no diagonal part: Z is everything, no copy
        return X, X[a:a]
    if e == 0:
        return X[:a], X[a:]
    if a == 0:
        return X[d - e :], X[: d - e]
    X_A, X_C, X_E = X.split([a, d - a - e, e])  # (one operation for the three views)
    return torch.cat([X_A, X_E]), X_C


def split_blocks(S: Tensor, a: int, e: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r""":math:`(S_{\mathcal Z\mathcal Z}, S_{\mathcal Z\mathcal C}, S_{\mathcal C\mathcal Z},
    S_{\mathcal C\mathcal C})` of a square matrix."""
    rows_Z, rows_C = split_rows(S, a, e)
    ZZ_t, ZC_t = split_rows(rows_Z.T, a, e)
    CZ_t, CC_t = split_rows(rows_C.T, a, e)
    return ZZ_t.T, ZC_t.T, CZ_t.T, CC_t.T


def _add_product_(out: Tensor, A: Tensor, B: Tensor) -> None:
    """``out += A @ B`` in place: one fused ``addmm_``, or two operations under vmap
    (which has no batching rule for ``addmm_``, :func:`singd.structures._linalg.tracing`)."""
    if _linalg.tracing():
        out.add_(A @ B)
    else:
        out.addmm_(A, B)


def join_rows(
    Y_Z: Tensor, C: Tensor, X: Tensor, a: int, e: int, middle: Tensor | None = None
) -> Tensor:
    r"""Rows :math:`(Y_{\mathcal Z}, \operatorname{diag}(C) X_{\mathcal C})` in index order
    (``middle`` in place of :math:`X_{\mathcal C}` if given).

    The diagonal part is written straight into a result laid out like ``X`` (for
    SINGD's :math:`X = A^\top` that avoids a transposing copy of the ``c × n`` rows).
    """
    _, X_C = split_rows(X, a, e)
    if middle is not None:
        X_C = middle
    c = X_C.shape[0]
    if c == 0:
        return Y_Z
    if _linalg.tracing():  # (Dynamo and vmap cannot write out= into a view)
        return torch.cat([Y_Z[:a], C.unsqueeze(1) * X_C, Y_Z[a:]])
    out = torch.empty_like(X)
    out[:a] = Y_Z[:a]
    torch.mul(C.unsqueeze(1), X_C, out=out[a : a + c])
    out[a + c :] = Y_Z[a:]
    return out


def gram_pieces(X: Tensor, a: int, e: int) -> Pieces:
    r""":math:`(M_{\mathcal Z\mathcal Z}, M_{\mathcal Z\mathcal C}, \operatorname{diag}
    M_{\mathcal C\mathcal C})` of :math:`M = X X^\top` in :math:`z d n + c n` operations."""
    X_Z, X_C = split_rows(X, a, e)
    return X_Z @ X_Z.T, X_Z @ X_C.T, row_sum_of_squares(X_C)


def project_masked(Q: Tensor, mask: Tensor) -> Tensor:
    r""":math:`\hat\Pi` of a square block onto the free positions ``mask`` (spec §3.3).

    A free entry whose mirror is not free absorbs it: :math:`Q_{ij} + Q_{ji}`; other
    free entries copy :math:`Q_{ij}`; the rest is zero.
    """
    zero = Q.new_zeros(())
    return torch.where(mask, Q + torch.where(mask.T, zero, Q.T), zero)


# --- row arrows: K_ZZ, W = K[Z, C], C -------------------------------------------------


def row_matmat(K_ZZ: Tensor, W: Tensor, C: Tensor, X: Tensor, a: int, e: int) -> Tensor:
    r""":math:`K X`: :math:`Y_{\mathcal Z} = K_{\mathcal Z\mathcal Z} X_{\mathcal Z} + W
    X_{\mathcal C}`, :math:`Y_{\mathcal C} = C \odot X_{\mathcal C}`."""
    X_Z, X_C = split_rows(X, a, e)
    return join_rows(torch.addmm(K_ZZ @ X_Z, W, X_C), C, X, a, e)


def row_rmatmat(K_ZZ: Tensor, W: Tensor, C: Tensor, X: Tensor, a: int, e: int) -> Tensor:
    r""":math:`K^\top X`: :math:`S_{\mathcal Z} = K_{\mathcal Z\mathcal Z}^\top X_{\mathcal Z}`,
    :math:`S_{\mathcal C} = W^\top X_{\mathcal Z} + C \odot X_{\mathcal C}`."""
    X_Z, X_C = split_rows(X, a, e)
    out = join_rows(K_ZZ.T @ X_Z, C, X, a, e)
    c = X_C.shape[0]
    if c > 0:
        _add_product_(out[a : a + c], W.T, X_Z)
    return out


def row_outer_matmat(K_ZZ: Tensor, W: Tensor, C: Tensor, X: Tensor, a: int, e: int) -> Tensor:
    r""":math:`K K^\top X` with the small block of :math:`K K^\top`
    (:math:`P_{\mathcal Z\mathcal Z} = K_{\mathcal Z\mathcal Z} K_{\mathcal Z\mathcal Z}^\top
    + W W^\top`) formed first: with :math:`S = C \odot X_{\mathcal C}`,

    .. math::
        Y_{\mathcal Z} = P_{\mathcal Z\mathcal Z} X_{\mathcal Z} + W S, \qquad
        Y_{\mathcal C} = C \odot (W^\top X_{\mathcal Z} + S),

    the same two ``z × c`` products with ``X`` as :math:`K (K^\top X)`, fewer
    operations, and the ``c × n`` rows written in place into one result laid out like
    ``X``."""
    X_Z, X_C = split_rows(X, a, e)
    c = X_C.shape[0]
    P_ZZ = torch.addmm(K_ZZ @ K_ZZ.T, W, W.T)
    if c == 0:
        return P_ZZ @ X_Z
    if _linalg.tracing():  # (Dynamo and vmap cannot write out= into a view)
        S = C.unsqueeze(1) * X_C
        Y_Z = torch.addmm(P_ZZ @ X_Z, W, S)
        return join_rows(Y_Z, C, X, a, e, middle=torch.addmm(S, W.T, X_Z))
    out = torch.empty_like(X)
    Y_C = out[a : a + c]
    torch.mul(C.unsqueeze(1), X_C, out=Y_C)  # S
    Y_Z = torch.addmm(P_ZZ @ X_Z, W, Y_C)
    Y_C.addmm_(W.T, X_Z).mul_(C.unsqueeze(1))
    out[:a] = Y_Z[:a]
    out[a + c :] = Y_Z[a:]
    return out


def row_matmul(first: Pieces, second: Pieces) -> Pieces:
    """Pieces of the product of two row arrows (module docstring)."""
    (K1, W1, C1), (K2, W2, C2) = first, second
    return K1 @ K2, torch.addmm(W1 * C2, K1, W2), C1 * C2


def row_inner(K_ZZ: Tensor, W: Tensor, C: Tensor, M: Pieces | None) -> Pieces:
    r""":math:`(Q_{\mathcal Z\mathcal Z}, Q_{\mathcal Z\mathcal C}, \operatorname{diag}
    Q_{\mathcal C\mathcal C})` of :math:`Q = K^\top M K`; ``M`` None means :math:`I`."""
    if M is None:
        return K_ZZ.T @ K_ZZ, K_ZZ.T @ W, W.square().sum(0) + C.square()
    M_ZZ, M_ZC, m_C = M
    T = torch.addmm(M_ZC * C, M_ZZ, W)
    q_C = (W * T).sum(0) + C * (W * M_ZC).sum(0) + C.square() * m_C
    return K_ZZ.T @ (M_ZZ @ K_ZZ), K_ZZ.T @ T, q_C


# --- column arrows: K_ZZ, V = K[C, Z], C ----------------------------------------------


def column_matmat(K_ZZ: Tensor, V: Tensor, C: Tensor, X: Tensor, a: int, e: int) -> Tensor:
    r""":math:`K X`: :math:`Y_{\mathcal Z} = K_{\mathcal Z\mathcal Z} X_{\mathcal Z}`,
    :math:`Y_{\mathcal C} = V X_{\mathcal Z} + C \odot X_{\mathcal C}`."""
    X_Z, X_C = split_rows(X, a, e)
    out = join_rows(K_ZZ @ X_Z, C, X, a, e)
    c = X_C.shape[0]
    if c > 0:
        _add_product_(out[a : a + c], V, X_Z)
    return out


def column_rmatmat(K_ZZ: Tensor, V: Tensor, C: Tensor, X: Tensor, a: int, e: int) -> Tensor:
    r""":math:`K^\top X`: :math:`S_{\mathcal Z} = K_{\mathcal Z\mathcal Z}^\top X_{\mathcal Z}
    + V^\top X_{\mathcal C}`, :math:`S_{\mathcal C} = C \odot X_{\mathcal C}`."""
    X_Z, X_C = split_rows(X, a, e)
    return join_rows(torch.addmm(K_ZZ.T @ X_Z, V.T, X_C), C, X, a, e)


def column_matmul(first: Pieces, second: Pieces) -> Pieces:
    """Pieces of the product of two column arrows (module docstring)."""
    (K1, V1, C1), (K2, V2, C2) = first, second
    return K1 @ K2, torch.addmm(C1.unsqueeze(1) * V2, V1, K2), C1 * C2


def column_inner(K_ZZ: Tensor, V: Tensor, C: Tensor, X: Tensor | None, a: int, e: int) -> Pieces:
    r""":math:`(Q_{\mathcal Z\mathcal Z}, Q_{\mathcal C\mathcal Z}, \operatorname{diag}
    Q_{\mathcal C\mathcal C})` of :math:`Q = K^\top X X^\top K` (``X`` None: :math:`I`)."""
    if X is None:
        return torch.addmm(K_ZZ.T @ K_ZZ, V.T, V), C.unsqueeze(1) * V, C.square()
    X_Z, X_C = split_rows(X, a, e)
    S_Z = torch.addmm(K_ZZ.T @ X_Z, V.T, X_C)
    Q_CZ = C.unsqueeze(1) * (X_C @ S_Z.T)
    return S_Z @ S_Z.T, Q_CZ, C.square() * row_sum_of_squares(X_C)
