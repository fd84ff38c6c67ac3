r"""Natural gradient and parameter step, as pure functions.

Natural gradient of one layer with gradient matrix
:math:`\hat G = [\nabla W \,|\, \nabla b] \in \mathbb{R}^{d_o \times d_K}`:

.. math::  \Delta = C C^\top \hat G\, K K^\top

computed as :math:`(K (K^\top \hat G^\top))^\top` in K's dtype, then
:math:`C (C^\top \cdot)` in C's dtype (spec §1.6 b).

Parameter step (β₂ ↔ ``lr``, α₂ ↔ ``momentum``, γ ↔ ``weight_decay``; coupled weight
decay, heavy-ball momentum without dampening, as in the paper):

.. math::  m_\mu \leftarrow \alpha_2 m_\mu + \Delta + \gamma\mu, \qquad
           \mu \leftarrow \mu - \beta_2 m_\mu
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix
from singd.structures.diagonal import DiagonalMatrix


def natural_gradient(K: StructuredMatrix, C: StructuredMatrix, G: Tensor) -> Tensor:
    r""":math:`C C^\top G K K^\top` for ``G`` of shape ``[d_o, d_K]``, in ``G``'s dtype."""
    out_dtype = G.dtype
    if isinstance(K, DiagonalMatrix) and isinstance(C, DiagonalMatrix) and K.dtype == C.dtype:
        # Both diagonal: one elementwise pass, c² kᵀ² ⊙ G (memory-bound on the weights).
        outer = C.diag.square().unsqueeze(1) * K.diag.square().unsqueeze(0)
        return (G.to(K.dtype) * outer).to(out_dtype)
    N = K.matmat(K.rmatmat(G.T.to(K.dtype))).T
    N = C.matmat(C.rmatmat(N.to(C.dtype)))
    return N.to(out_dtype)


def kfac_natural_gradient(P_K: Tensor, P_C: Tensor, G: Tensor) -> Tensor:
    r""":math:`P_C G P_K` with the inverses :math:`P = (S + \lambda I)^{-1}` (KFAC)."""
    out_dtype = G.dtype
    return (P_C @ G.to(P_C.dtype) @ P_K.to(P_C.dtype)).to(out_dtype)


@torch.no_grad()
def apply_parameter_step(
    params: list[Tensor],
    directions: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> list[Tensor | None]:
    """Apply :math:`\\mu \\leftarrow \\mu - \\beta_2 m_\\mu` in place (module docstring).

    Args:
        params: Parameters to update.
        directions: Their preconditioned gradients :math:`\\Delta`.
        momentum_buffers: Existing buffers, or None where none exists yet (created
            as zeros, so the first step's buffer is :math:`\\Delta + \\gamma\\mu`).
        lr: β₂.
        momentum: α₂.
        weight_decay: γ.

    Returns:
        The updated momentum buffers (None everywhere if ``momentum == 0``).
    """
    new_buffers: list[Tensor | None] = []
    for p, d_p, buf in zip(params, directions, momentum_buffers, strict=True):
        if weight_decay != 0:
            d_p = d_p.add(p, alpha=weight_decay)
        if momentum != 0:
            if buf is None:
                buf = torch.zeros_like(p)
            buf.mul_(momentum).add_(d_p)
            d_p = buf
        p.add_(d_p, alpha=-lr)
        new_buffers.append(buf if momentum != 0 else None)
    return new_buffers
