r"""Hierarchical factors (``"hierarchical(k1, k2)"``, published alias ``"hierarchical{k1}_{k2}"``).

Pattern (spec §3.7) with the index blocks :math:`\mathcal A = [0, a)`,
:math:`\mathcal C = [a, a+c)`, :math:`\mathcal E = [a+c, d)`:

.. math::
    K = \begin{pmatrix} A & B_1 & B_2 \\ 0 & \operatorname{diag}(C) & 0 \\ 0 & D & E
    \end{pmatrix},
    \qquad a = \min(k_1, d),\ e = \min(k_2, d - a),\ c = d - a - e,

stored as ``A`` ``[a, a]``, ``B = [B_1 | B_2]`` ``[a, c+e]``, ``C`` ``[c]``, ``D``
``[e, c]``, ``E`` ``[e, e]``: about :math:`(k_1 + k_2) d` numbers. Small sizes follow
the published code: :math:`d \le k_1` keeps only ``A``; :math:`k_1 < d \le k_1 + k_2`
keeps ``A``, ``B`` and ``E`` (no ``C``, ``D``); the other tensors are then empty.

**Dense part and diagonal part.** Let :math:`\mathcal Z = \mathcal A \cup \mathcal E`
(:math:`z = a + e` indices). Then :math:`K_{\mathcal C\mathcal Z} = 0`,
:math:`K_{\mathcal C \mathcal C}` is diagonal, and the rest is dense-ish:

.. math::
    K_{\mathcal Z\mathcal Z} = \begin{pmatrix} A & B_2 \\ 0 & E \end{pmatrix},
    \qquad W := K_{\mathcal Z \mathcal C} = \begin{pmatrix} B_1 \\ D \end{pmatrix}.

Every operation is written with these three pieces; the products are closed
(:math:`K_{\mathcal Z\mathcal Z}` stays block upper-triangular, :math:`K_{\mathcal C
\mathcal Z}` stays zero).

**Projection.** For symmetric :math:`Q`: ``A``, ``E`` and ``C`` copy
:math:`Q_{\mathcal A\mathcal A}`, :math:`Q_{\mathcal E\mathcal E}`,
:math:`\operatorname{diag} Q_{\mathcal C\mathcal C}`; ``B`` and ``D`` absorb their
mirrors (:math:`B_1 = Q_{\mathcal A\mathcal C} + Q_{\mathcal C\mathcal A}^\top`, i.e.
:math:`2Q_{\mathcal A\mathcal C}`, and so on).

**from_inner.** This is a *row arrow* (:mod:`singd.structures._arrow`) with the dense
index set :math:`\mathcal Z`: :math:`\hat\Pi(K^\top M K)`, :math:`M = X X^\top`, needs
only :math:`X_{\mathcal Z} X^\top` (:math:`z d n` multiply-adds) and the row norms
:math:`m_C` of :math:`X_{\mathcal C}`,

.. math::
    T &= M_{\mathcal Z\mathcal Z} W + M_{\mathcal Z\mathcal C} \operatorname{diag}(C),\\
    Q_{\mathcal Z\mathcal Z} &= K_{\mathcal Z\mathcal Z}^\top M_{\mathcal Z\mathcal Z}
        K_{\mathcal Z\mathcal Z}, \qquad
    Q_{\mathcal Z\mathcal C} = K_{\mathcal Z\mathcal Z}^\top T, \\
    \operatorname{diag} Q_{\mathcal C\mathcal C} &= \operatorname{colsum}(W \odot T)
        + C \odot \operatorname{colsum}(W \odot M_{\mathcal Z\mathcal C}) + C^2 \odot m_C,

followed by the projection: half the work of forming :math:`S = K^\top X` and then the
needed blocks of :math:`S S^\top`, and never a ``d × d`` (or ``d × n``) temporary.
:math:`\hat\Pi(K^\top K)` is the same with :math:`M = I`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from singd.structures import _arrow, _linalg
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
        a, _, e = self.sizes(d)
        S_ZZ, S_ZC, S_CZ, S_CC = _arrow.split_blocks(sym, a, e)
        return _assemble(self, d, _project_zz(S_ZZ, a), S_ZC + S_CZ.T, S_CC.diagonal().clone())

    def from_mat_inner(self, X: Tensor) -> HierarchicalMatrix:
        a, _, e = self.sizes(X.shape[0])
        return _project(self, X.shape[0], _arrow.gram_pieces(X, a, e))

    def zeros(self, dim, *, dtype=None, device=None) -> HierarchicalMatrix:
        a, c, e = self.sizes(dim)

        def z(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        tensors = {"A": z(a, a), "B": z(a, c + e), "C": z(c), "D": z(e, c), "E": z(e, e)}
        return HierarchicalMatrix(self, dim, tensors)


def _project_zz(Q_ZZ: Tensor, a: int) -> Tensor:
    """The dense part's projection: A and E copied, B2 = Q_AE + Q_EAᵀ, E-A block zero."""
    free = torch.ones_like(Q_ZZ, dtype=torch.bool)
    free[a:, :a] = False
    return _arrow.project_masked(Q_ZZ, free)


def _project(structure: Hierarchical, dim: int, Q: _arrow.Pieces) -> HierarchicalMatrix:
    r""":math:`\hat\Pi(Q)` from the pieces :math:`(Q_{\mathcal Z\mathcal Z},
    Q_{\mathcal Z\mathcal C}, \operatorname{diag}Q_{\mathcal C\mathcal C})` of a
    symmetric :math:`Q`: the off-diagonal block absorbs its mirror (:math:`2Q_{\mathcal Z
    \mathcal C}`)."""
    Q_ZZ, Q_ZC, q_C = Q
    a, _, _ = structure.sizes(dim)
    return _assemble(structure, dim, _project_zz(Q_ZZ, a), 2 * Q_ZC, q_C)


def _assemble(
    structure: Hierarchical, dim: int, K_ZZ: Tensor, W: Tensor, C: Tensor
) -> HierarchicalMatrix:
    """The stored blocks A, B = [B1 | B2], C, D, E from the arrow pieces, which must be
    the caller's own new tensors (``C`` is stored as it is).

    Few operations on purpose (accelerators pay per operation): splits give the blocks
    of ``K_ZZ`` and ``W``; ``B`` is one concatenation; ``A``, ``D`` and ``E`` are
    contiguous copies (stored tensors own their memory). The pieces are remembered, so
    the next product or projection needs no concatenation to get them back.
    """
    a, _, e = structure.sizes(dim)
    top, bottom = K_ZZ.split([a, e])
    A, B2 = top.split([a, e], dim=1)
    B1, D = W.split([a, e])
    tensors = {
        "A": A.clone(memory_format=torch.contiguous_format),
        "B": torch.cat([B1, B2], dim=1),
        "C": C,
        "D": D.clone(),
        "E": bottom[:, a:].clone(memory_format=torch.contiguous_format),
    }
    matrix = HierarchicalMatrix(structure, dim, tensors)
    matrix._remember((K_ZZ, W, C))
    return matrix


class HierarchicalMatrix(StructuredMatrix):
    """A hierarchical matrix stored as ``A``, ``B``, ``C``, ``D``, ``E`` (module docstring)."""

    structure: Hierarchical
    _cached: tuple[tuple[int, ...], _arrow.Pieces] | None = None

    def _sizes(self) -> tuple[int, int, int]:
        return self.structure.sizes(self.dim)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self._tensors.values())

    def _remember(self, pieces: _arrow.Pieces) -> None:
        """Keep ``pieces`` as this matrix's until a stored tensor changes in place (its
        version counter moves; views share their base's)."""
        if not _linalg.tracing():  # (compiled or vmapped code: no version counters)
            self._cached = (self._versions(), pieces)

    def _pieces(self) -> _arrow.Pieces:
        r""":math:`(K_{\mathcal Z\mathcal Z}, W, C)`: dense part, dense rows over C, diagonal."""
        cached = None if _linalg.tracing() else self._cached
        if cached is not None and cached[0] == self._versions():
            return cached[1]
        t = self._tensors
        a, c, e = self._sizes()
        B1, B2 = t["B"].split([c, e], dim=1)
        # [[A, B2], [0, E]]: the zero block as left padding of E (one operation)
        K_ZZ = torch.cat([torch.cat([t["A"], B2], dim=1), F.pad(t["E"], (a, 0))])
        W = torch.cat([B1, t["D"]])
        self._remember((K_ZZ, W, t["C"]))
        return K_ZZ, W, t["C"]

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
        a, _, e = self._sizes()
        return _arrow.row_matmat(*self._pieces(), X.to(self.dtype), a, e)

    def rmatmat(self, X: Tensor) -> Tensor:
        a, _, e = self._sizes()
        return _arrow.row_rmatmat(*self._pieces(), X.to(self.dtype), a, e)

    def outer_matmat(self, X: Tensor) -> Tensor:
        r""":math:`M M^\top X` (:func:`singd.structures._arrow.row_outer_matmat`: the
        preconditioning's :math:`K K^\top` in one pass)."""
        a, _, e = self._sizes()
        return _arrow.row_outer_matmat(*self._pieces(), X.to(self.dtype), a, e)

    def matmul(self, other: HierarchicalMatrix) -> HierarchicalMatrix:
        self._check_same(other)
        product = _arrow.row_matmul(self._pieces(), other.to(self.dtype)._pieces())
        return _assemble(self.structure, self.dim, *product)

    def from_inner(self, X: Tensor | None = None) -> HierarchicalMatrix:
        a, _, e = self._sizes()
        M = None if X is None else _arrow.gram_pieces(X.to(self.dtype), a, e)
        return _project(self.structure, self.dim, _arrow.row_inner(*self._pieces(), M))

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
