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

from singd.functional.scalars import Scalar, minus_scaled
from singd.structures.base import StructuredMatrix
from singd.structures.block_diagonal import BlockDiagonalMatrix
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from singd.structures.hierarchical import HierarchicalMatrix


def natural_gradient(K: StructuredMatrix, C: StructuredMatrix, G: Tensor) -> Tensor:
    r""":math:`C C^\top G K K^\top` for ``G`` of shape ``[d_o, d_K]``, in ``G``'s dtype.

    float16 factors are multiplied in float32: float16 tops out at 65504, which the
    product of ordinary gradients with :math:`K K^\top` and :math:`C C^\top` exceeds
    (inputs ×100 gave 95 631), while the factors themselves stay small. bfloat16 has
    float32's range and is used as it is.
    """
    out_dtype = G.dtype
    if K.dtype == torch.float16:
        K = K.to(torch.float32)
    if C.dtype == torch.float16:
        C = C.to(torch.float32)
    if isinstance(K, DiagonalMatrix) and isinstance(C, DiagonalMatrix) and K.dtype == C.dtype:
        # Both diagonal: (c² ⊙ rows) ⊙ k² columns, memory-bound on the weights; scaled
        # in place, without a d_o × d_K outer product (a fresh temporary that size costs
        # page faults on CPU: 0.5 ms per step on the benchmark CNN).
        scaled = G.to(K.dtype) * C.diag.square().unsqueeze(1)
        return scaled.mul_(K.diag.square()).to(out_dtype)
    if isinstance(K, DenseMatrix) and isinstance(C, DenseMatrix) and K.dtype == C.dtype:
        # C (Cᵀ G K) Kᵀ: four products and two transposes (instead of four of each)
        G = G.to(K.dtype)
        return (C.mat @ (((C.mat.T @ G) @ K.mat) @ K.mat.T)).to(out_dtype)
    N = _outer_matmat(K, G.T.to(K.dtype)).T
    N = _outer_matmat(C, N.to(C.dtype))
    return N.to(out_dtype)


def _outer_matmat(M: StructuredMatrix, X: Tensor) -> Tensor:
    r""":math:`M M^\top X`, equal to round-off to :math:`M (M^\top X)`. Block-diagonal
    factors form the products of their blocks :math:`M_i M_i^\top` first (small,
    ``b × b``) and apply them in one block product: one product with ``X`` instead of
    two (measured 7.3 → 5.3 ms for the benchmark CNN's preconditioning, one thread);
    hierarchical ones pass over ``X`` once with the small block of :math:`M M^\top`
    (:func:`singd.structures._arrow.row_outer_matmat`)."""
    if isinstance(M, BlockDiagonalMatrix | HierarchicalMatrix):
        return M.outer_matmat(X)
    return M.matmat(M.rmatmat(X))


def kfac_natural_gradient(P_K: Tensor, P_C: Tensor, G: Tensor) -> Tensor:
    r""":math:`P_C G P_K` with the inverses :math:`P = (S + \lambda I)^{-1}` (KFAC).

    float16 inverses are multiplied in float32 (see :func:`natural_gradient`).
    """
    out_dtype = G.dtype
    dtype = torch.float32 if P_C.dtype == torch.float16 else P_C.dtype
    return (P_C.to(dtype) @ G.to(dtype) @ P_K.to(dtype)).to(out_dtype)


@torch.no_grad()
def apply_parameter_step(
    params: list[Tensor],
    directions: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    lr: Scalar,
    momentum: float,
    weight_decay: float,
) -> None:
    r"""Apply :math:`\mu \leftarrow \mu - \beta_2 m_\mu` in place (module docstring).

    Args:
        params: Parameters to update.
        directions: Their preconditioned gradients :math:`\Delta` (not written: they
            may be ``.grad``).
        states: Per-parameter state dicts; ``momentum_buffer`` is created as zeros
            on first use (so the first buffer is :math:`\Delta + \gamma\mu`), as in
            ``torch.optim.SGD``.
        lr: β₂ (a number, or a 0-d tensor: :mod:`singd.functional.scalars`).
        momentum: α₂.
        weight_decay: γ.
    """
    if not params:
        return
    if weight_decay != 0:  # (out of place: the directions may be the gradients)
        directions = list(torch._foreach_add(directions, params, alpha=weight_decay))
    buffers = None
    if momentum != 0:
        buffers = []
        for p, state in zip(params, states, strict=True):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
    parameter_step_(params, directions, buffers, lr=lr, momentum=momentum, weight_decay=0.0)


@torch.no_grad()
def parameter_step_(
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor] | None,
    *,
    lr: Scalar,
    momentum: float,
    weight_decay: float,
) -> None:
    r"""The step of :func:`parameter_step` in place: ``params`` and ``buffers`` are
    overwritten with the values :func:`parameter_step` returns (the same rounding).

    Multi-tensor (foreach) kernels: the same arithmetic per tensor as the loop
    ``Δ.add_(μ, alpha=γ); buf.mul_(α₂).add_(Δ); μ.add_(buf, alpha=-β₂)``, without its
    per-tensor dispatch overhead. The ``directions`` are consumed, as by
    :func:`parameter_step`.
    """
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_add_(directions, params, alpha=weight_decay)
    if momentum != 0:
        if buffers is None:
            raise ValueError("parameter_step_: momentum ≠ 0 needs the momentum buffers.")
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, directions)
        directions = buffers
    if isinstance(lr, Tensor):  # (a compiled step's device scalar: alpha= takes numbers)
        torch._foreach_copy_(params, minus_scaled(params, directions, lr))
    else:
        torch._foreach_add_(params, directions, alpha=-lr)


def parameter_step_stays_finite(
    param_max: float,
    direction_max: float,
    buffer_max: float,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    largest: float,
) -> bool:
    r"""Whether one parameter step certainly writes finite values only, from bounds.

    With :math:`\max|\mu| \le p`, :math:`\max|\Delta| \le \delta` and
    :math:`\max|m_\mu| \le b` (``param_max``, ``direction_max``, ``buffer_max``):

    .. math::  |\Delta + \gamma\mu| \le D = \delta + |\gamma| p, \qquad
               |m_\mu'| \le B = |\alpha_2| b + D, \qquad
               |\mu'| \le p + |\beta_2| B

    (:math:`B` replaced by :math:`D` without momentum). Rounding makes each of the
    three rounded operations exceed its exact value by at most a factor
    :math:`1 + 2^{-t}` (:math:`t` ≥ 8 mantissa bits), so bounds at most
    ``largest / 4`` (``largest``: the largest finite value of the dtypes involved)
    prove every written value finite. False for inf or NaN bounds, and where the
    bound is too large to prove anything (the step may still be finite).
    """
    decayed = direction_max + abs(weight_decay) * param_max  # D
    new_buffer_max = abs(momentum) * buffer_max + decayed if momentum != 0 else decayed
    new_param_max = param_max + abs(lr) * new_buffer_max
    # (False for NaN: every comparison with NaN is)
    return all(v <= largest / 4 for v in (decayed, new_buffer_max, new_param_max))


@torch.no_grad()
def parameter_step(
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor] | None,
    *,
    lr: Scalar,
    momentum: float,
    weight_decay: float,
) -> tuple[list[Tensor], list[Tensor]]:
    r"""The step of :func:`apply_parameter_step` out of place: ``(new μ, new m_μ)``.

    Nothing is written: ``params`` and ``buffers`` keep their values, so the caller can
    commit the new values or keep the old ones (:mod:`singd.optim.guard`). The
    ``directions`` are consumed (their storage holds the new buffers), so they must
    be the caller's own temporaries, never ``.grad``.

    Args:
        params: Parameters :math:`\mu`.
        directions: Preconditioned gradients :math:`\Delta` (overwritten).
        buffers: Momentum buffers :math:`m_\mu`, one per parameter (zeros for a
            parameter without one yet: the same first step), or None if α₂ = 0.
        lr: β₂ (a number, or a 0-d tensor: :mod:`singd.functional.scalars`).
        momentum: α₂.
        weight_decay: γ.

    Returns:
        The new parameters and the new buffers (an empty list if α₂ = 0).
    """
    if not params:
        return [], []
    if weight_decay != 0:
        torch._foreach_add_(directions, params, alpha=weight_decay)
    new_buffers: list[Tensor] = []
    if momentum != 0:
        if buffers is None:
            raise ValueError("parameter_step: momentum ≠ 0 needs the momentum buffers.")
        # m ← α₂ m + Δ + γμ (same rounding as buf.mul_(α₂).add_(Δ + γμ))
        scaled = torch._foreach_mul(buffers, momentum)
        torch._foreach_add_(scaled, directions)
        new_buffers = list(scaled)
        directions = new_buffers
    return minus_scaled(params, directions, lr), new_buffers


def kl_clip_factor(kl_terms: list[Tensor], *, lr: Scalar, kl_clip: float) -> Tensor:
    r"""KFAC's KL clipping: :math:`\nu = \min\bigl(1, \sqrt{c / (\beta_2^2 \sum_l
    \langle G_l, \Delta_l \rangle)}\bigr)`.

    :math:`\langle G, \Delta\rangle = \langle g, F^{-1} g\rangle` per layer, so
    :math:`\beta_2^2 \sum_l \langle G_l, \Delta_l\rangle` is the (quadratic-model)
    KL change of the step; scaling the natural gradients by :math:`\nu` bounds it by
    :math:`c` = ``kl_clip``. Computed on the device, without synchronising.
    """
    terms = torch.stack(kl_terms)
    total = terms.to(torch.promote_types(terms.dtype, torch.float32)).sum() * lr**2
    return torch.clamp(
        torch.sqrt(kl_clip / total.clamp_min(torch.finfo(total.dtype).tiny)), max=1.0
    )
