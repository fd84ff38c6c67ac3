r"""Hierarchical factors (``"hierarchical(k1, k2)"``, published alias ``"hierarchical{k1}_{k2}"``).

Pattern (spec §3.7) with the index blocks :math:`\mathcal A = [0, a)`,
:math:`\mathcal C = [a, a+c)`, :math:`\mathcal E = [a+c, d)`:

.. math::
    M = \begin{pmatrix} A & B_1 & B_2 \\ 0 & \operatorname{diag}(C) & 0 \\ 0 & D & E
    \end{pmatrix},
    \qquad a = \min(k_1, d),\ e = \min(k_2, d - a),\ c = d - a - e,

stored as ``A`` ``[a, a]``, ``B = [B_1 | B_2]`` ``[a, c+e]``, ``C`` ``[c]``, ``D``
``[e, c]``, ``E`` ``[e, e]``: about :math:`(k_1 + k_2) d` numbers. Small sizes follow
the published code: :math:`d \le k_1` keeps only ``A``; :math:`k_1 < d \le k_1 + k_2`
keeps ``A``, ``B`` and ``E`` (no ``C``, ``D``); the other tensors are then empty.

**Dense part and diagonal part.** Let :math:`\mathcal Z = \mathcal A \cup \mathcal E`
(:math:`z = a + e` indices). Then :math:`M_{\mathcal C\mathcal Z} = 0`,
:math:`M_{\mathcal C \mathcal C}` is diagonal, and the rest is dense-ish:

.. math::
    M_{\mathcal Z\mathcal Z} = \begin{pmatrix} A & B_2 \\ 0 & E \end{pmatrix},
    \qquad W := M_{\mathcal Z \mathcal C} = \begin{pmatrix} B_1 \\ D \end{pmatrix}.

Every operation is written with these three pieces; the products are closed
(:math:`M_{\mathcal Z\mathcal Z}` stays block upper-triangular, :math:`M_{\mathcal C
\mathcal Z}` stays zero).

**Projection.** For symmetric :math:`Q`: ``A``, ``E`` and ``C`` copy
:math:`Q_{\mathcal A\mathcal A}`, :math:`Q_{\mathcal E\mathcal E}`,
:math:`\operatorname{diag} Q_{\mathcal C\mathcal C}`; ``B`` and ``D`` absorb their
mirrors (:math:`B_1 = Q_{\mathcal A\mathcal C} + Q_{\mathcal C\mathcal A}^\top`, i.e.
:math:`2Q_{\mathcal A\mathcal C}`, and so on).

**from_inner.** :math:`\hat\Pi(K^\top M K)` with :math:`M = X X^\top` needs only
:math:`M_{\mathcal Z\mathcal Z}`, :math:`M_{\mathcal Z\mathcal C}` and
:math:`m_C = \operatorname{diag} M_{\mathcal C\mathcal C}`, i.e. :math:`X_{\mathcal Z}
X^\top` (:math:`z d n` multiply-adds) and the row norms of :math:`X_{\mathcal C}`:

.. math::
    T &= M_{\mathcal Z\mathcal Z} W + M_{\mathcal Z\mathcal C} \operatorname{diag}(C),\\
    Q_{\mathcal Z\mathcal Z} &= K_{\mathcal Z\mathcal Z}^\top M_{\mathcal Z\mathcal Z}
        K_{\mathcal Z\mathcal Z}, \qquad
    Q_{\mathcal Z\mathcal C} = K_{\mathcal Z\mathcal Z}^\top T, \\
    \operatorname{diag} Q_{\mathcal C\mathcal C} &= \operatorname{colsum}(W \odot T)
        + C \odot \operatorname{colsum}(W \odot M_{\mathcal Z\mathcal C}) + C^2 \odot m_C,

followed by the projection. This is half the work of forming :math:`S = K^\top X`
(:math:`z d n`) and then the needed blocks of :math:`S S^\top` (another :math:`z d n`),
and never forms a ``d × d`` matrix. :math:`\hat\Pi(K^\top K)` is the same with
:math:`M = I`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from singd.structures._linalg import row_sum_of_squares
from singd.structures.base import Structure, StructuredMatrix, check_size


@dataclasses.dataclass(frozen=True)
class Hierarchical(Structure):
    """Hierarchical factors: ``k1`` dense top rows, ``k2`` dense bottom rows, diagonal middle.

    Args:
        k1: :math:`K_1`, the size of the dense top-left block ``A``.
        k2: :math:`K_2`, the size of the dense bottom-right block ``E``.
    """

    k1: int
    k2: int
    name = "hierarchical"

    def __post_init__(self) -> None:
        check_size("k1", self.k1, minimum=0)
        check_size("k2", self.k2, minimum=0)

    def sizes(self, dim: int) -> tuple[int, int, int]:
        """``(a, c, e)``: sizes of the blocks :math:`\\mathcal A, \\mathcal C, \\mathcal E`."""
        a = min(self.k1, dim)
        e = min(self.k2, dim - a)
        return a, dim - a - e, e

    def from_dense(self, sym: Tensor) -> HierarchicalMatrix:
        d = sym.shape[0]
        a, c, _ = self.sizes(d)
        Z = _z_index(d, a, c, sym.device)
        Q_ZZ = sym[Z][:, Z]
        # the mirror Q_CZ^T is added (rule of spec §3.3); halved because _project doubles
        Q_ZC = 0.5 * (sym[Z, a : a + c] + sym[a : a + c, Z].T)
        q_C = sym.diagonal()[a : a + c]
        return _project(self, d, Q_ZZ, Q_ZC, q_C)

    def from_mat_inner(self, X: Tensor) -> HierarchicalMatrix:
        return _project(self, X.shape[0], *_gram_pieces(self, X))

    def zeros(self, dim, *, dtype=None, device=None) -> HierarchicalMatrix:
        a, c, e = self.sizes(dim)

        def z(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        tensors = {"A": z(a, a), "B": z(a, c + e), "C": z(c), "D": z(e, c), "E": z(e, e)}
        return HierarchicalMatrix(self, dim, tensors)


def _z_index(d: int, a: int, c: int, device: torch.device) -> Tensor:
    """Indices of :math:`\\mathcal Z = \\mathcal A \\cup \\mathcal E`, in order."""
    return torch.cat([torch.arange(a, device=device), torch.arange(a + c, d, device=device)])


def _split_z(X: Tensor, a: int, c: int) -> tuple[Tensor, Tensor]:
    """Rows of ``X`` as :math:`X_{\\mathcal Z}` (a copy) and :math:`X_{\\mathcal C}` (a view)."""
    if c == 0:  # d <= k1 + k2: Z is everything, no copy
        return X, X[a:a]
    return torch.cat([X[:a], X[a + c :]]), X[a : a + c]


def _join_z(Y_Z: Tensor, C: Tensor, X_C: Tensor, a: int) -> Tensor:
    r"""Rows in the order A, C, E from :math:`Y_{\mathcal Z}` and :math:`Y_{\mathcal C} =
    \operatorname{diag}(C) X_{\mathcal C}`, the latter written in place (no temporary)."""
    c = X_C.shape[0]
    if c == 0:
        return Y_Z
    out = Y_Z.new_empty(Y_Z.shape[0] + c, Y_Z.shape[1])
    out[:a] = Y_Z[:a]
    torch.mul(C.unsqueeze(1), X_C, out=out[a : a + c])
    out[a + c :] = Y_Z[a:]
    return out


def _gram_pieces(structure: Hierarchical, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r""":math:`M_{\mathcal Z\mathcal Z}, M_{\mathcal Z\mathcal C}, \operatorname{diag}
    M_{\mathcal C\mathcal C}` of :math:`M = X X^\top` in :math:`z d n + c n` operations."""
    a, c, _ = structure.sizes(X.shape[0])
    X_Z, X_C = _split_z(X, a, c)
    P = X_Z @ X.T  # [z, d]: the Z rows of X X^T
    M_ZZ = torch.cat([P[:, :a], P[:, a + c :]], dim=1)
    return M_ZZ, P[:, a : a + c], row_sum_of_squares(X_C)


def _project(
    structure: Hierarchical, dim: int, Q_ZZ: Tensor, Q_ZC: Tensor, q_C: Tensor
) -> HierarchicalMatrix:
    r""":math:`\hat\Pi(Q)` from the pieces :math:`Q_{\mathcal Z\mathcal Z}`,
    :math:`Q_{\mathcal Z\mathcal C}` and :math:`\operatorname{diag}Q_{\mathcal C
    \mathcal C}` of a symmetric :math:`Q` (:math:`Q_{\mathcal C\mathcal Z} =
    Q_{\mathcal Z\mathcal C}^\top`)."""
    a, _, _ = structure.sizes(dim)
    tensors = {
        "A": Q_ZZ[:a, :a],
        # B_2 = Q_AE + Q_EA^T: the E-A block is off-pattern
        "B": torch.cat([2 * Q_ZC[:a], Q_ZZ[:a, a:] + Q_ZZ[a:, :a].T], dim=1),
        "C": q_C,
        "D": 2 * Q_ZC[a:],
        "E": Q_ZZ[a:, a:],
    }
    contiguous = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    return HierarchicalMatrix(structure, dim, contiguous)


class HierarchicalMatrix(StructuredMatrix):
    """A hierarchical matrix stored as ``A``, ``B``, ``C``, ``D``, ``E`` (module docstring)."""

    structure: Hierarchical

    def _sizes(self) -> tuple[int, int, int]:
        return self.structure.sizes(self.dim)

    def _pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`(K_{\mathcal Z\mathcal Z}, W, C)`: dense part, dense column block, diagonal."""
        t = self._tensors
        a, c, e = self._sizes()
        lower_left = t["E"].new_zeros(e, a)
        K_ZZ = torch.cat(
            [torch.cat([t["A"], t["B"][:, c:]], dim=1), torch.cat([lower_left, t["E"]], dim=1)]
        )
        W = torch.cat([t["B"][:, :c], t["D"]])
        return K_ZZ, W, t["C"]

    def _from_pieces(self, K_ZZ: Tensor, W: Tensor, C: Tensor) -> HierarchicalMatrix:
        a, _, _ = self._sizes()
        tensors = {
            "A": K_ZZ[:a, :a],
            "B": torch.cat([W[:a], K_ZZ[:a, a:]], dim=1),
            "C": C,
            "D": W[a:],
            "E": K_ZZ[a:, a:],
        }
        return self._like(
            {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        )

    def to_dense(self) -> Tensor:
        t = self._tensors
        a, c, _ = self._sizes()
        out = t["A"].new_zeros(self.dim, self.dim)
        out[:a, :a] = t["A"]
        out[:a, a:] = t["B"]
        out[a : a + c, a : a + c] = torch.diag(t["C"])
        out[a + c :, a : a + c] = t["D"]
        out[a + c :, a + c :] = t["E"]
        return out

    def matmat(self, X: Tensor) -> Tensor:
        a, c, _ = self._sizes()
        K_ZZ, W, C = self._pieces()
        X_Z, X_C = _split_z(X.to(self.dtype), a, c)
        return _join_z(torch.addmm(K_ZZ @ X_Z, W, X_C), C, X_C, a)

    def rmatmat(self, X: Tensor) -> Tensor:
        a, c, _ = self._sizes()
        K_ZZ, W, C = self._pieces()
        X_Z, X_C = _split_z(X.to(self.dtype), a, c)
        out = _join_z(K_ZZ.T @ X_Z, C, X_C, a)
        if c > 0:
            out[a : a + c].addmm_(W.T, X_Z)  # S_C = diag(C) X_C + Wᵀ X_Z
        return out

    def matmul(self, other: HierarchicalMatrix) -> HierarchicalMatrix:
        self._check_same(other)
        K_ZZ, W, C = self._pieces()
        K2_ZZ, W2, C2 = other.to(self.dtype)._pieces()
        return self._from_pieces(K_ZZ @ K2_ZZ, K_ZZ @ W2 + W * C2, C * C2)

    def from_inner(self, X: Tensor | None = None) -> HierarchicalMatrix:
        K_ZZ, W, C = self._pieces()
        if X is None:  # M = I
            Q_ZZ = K_ZZ.T @ K_ZZ
            q_C = W.square().sum(0) + C.square()
            return _project(self.structure, self.dim, Q_ZZ, K_ZZ.T @ W, q_C)
        M_ZZ, M_ZC, m_C = _gram_pieces(self.structure, X.to(self.dtype))
        T = M_ZZ @ W + M_ZC * C
        Q_ZZ = K_ZZ.T @ (M_ZZ @ K_ZZ)
        q_C = (W * T).sum(0) + C * (W * M_ZC).sum(0) + C.square() * m_C
        return _project(self.structure, self.dim, Q_ZZ, K_ZZ.T @ T, q_C)

    def diagonal(self) -> Tensor:
        t = self._tensors
        return torch.cat([t["A"].diagonal(), t["C"], t["E"].diagonal()])

    def diag_add_(self, value: float | Tensor) -> HierarchicalMatrix:
        t = self._tensors
        t["A"].diagonal().add_(value)
        t["C"].add_(value)
        t["E"].diagonal().add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        return self._stored_frobenius_norm()


Hierarchical.matrix_cls = HierarchicalMatrix
