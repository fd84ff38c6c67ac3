r"""The SINGD / IKFAC update of the Kronecker factors, as pure functions.

Glossary (paper symbol ↔ argument): β₁ ↔ ``lr_cov``, α₁ ↔ ``alpha1``,
λ ↔ ``damping``; :math:`H_K = \hat\Pi(K^\top U K)`, :math:`H_C = \hat\Pi(C^\top G C)`;
:math:`\overline{\operatorname{Tr}}(X) = \operatorname{Tr}(X)/\dim X`.

INGD / SINGD (``kfac_like=False``; paper Fig. 4, spec §1.5):

.. math::
    m_K &\leftarrow \alpha_1 m_K + \tfrac12\bigl(u\,\overline{\operatorname{Tr}}(H_C) H_K
          + \lambda\,\overline{\operatorname{Tr}}(C^\top C)\,\hat\Pi(K^\top K) - I\bigr) \\
    m_C &\leftarrow \alpha_1 m_C + \tfrac12\bigl(u\,\overline{\operatorname{Tr}}(H_K) H_C
          + \lambda\,\overline{\operatorname{Tr}}(K^\top K)\,\hat\Pi(C^\top C) - I\bigr) \\
    K &\leftarrow K (I - \beta_1 m_K), \qquad C \leftarrow C (I - \beta_1 m_C)

IKFAC (``kfac_like=True``, α₁ = 0; paper Fig. 3):
:math:`m_K = \tfrac12(H_K + \lambda \hat\Pi(K^\top K) - I)`,
:math:`m_C = \tfrac12(u H_C + \lambda \hat\Pi(C^\top C) - I)`.

:math:`u = s_{t-1}/s_t^2` removes the gradient scale from :math:`H_C`
(see :mod:`singd.amp`); it is 1 without a GradScaler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from singd.functional.scalars import Scalar, is_one
from singd.structures.base import StructuredMatrix


@dataclasses.dataclass(frozen=True)
class FactorHyperparams:
    """Hyper-parameters of one factor update (resolved from a param group)."""

    lr_cov: Scalar  # β₁ (a 0-d tensor in a compiled step: singd.functional.scalars)
    damping: float  # λ
    alpha1: float  # α₁
    kfac_like: bool
    normalize_lr_cov: bool


@dataclasses.dataclass
class FactorState:
    """The Kronecker factors of one layer and their Riemannian momenta (None if α₁ = 0)."""

    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix | None = None
    m_C: StructuredMatrix | None = None


def riemannian_gradients(
    K: StructuredMatrix,
    C: StructuredMatrix,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    hp: FactorHyperparams,
    h_c_unscale: Scalar = 1.0,
) -> tuple[StructuredMatrix, StructuredMatrix]:
    r"""The new gradient terms of :math:`m_K` and :math:`m_C` (without α₁ momentum).

    Args:
        K: Input-side factor (:math:`K K^\top \approx U^{-1}`).
        C: Output-side factor (:math:`C C^\top \approx G^{-1}`).
        H_K: :math:`\hat\Pi(K^\top U K)`, accumulated over the backward passes.
        H_C: :math:`\hat\Pi(C^\top G C)`, still carrying the gradient scale.
        hp: Hyper-parameters.
        h_c_unscale: :math:`u`, the factor that un-scales ``H_C``.

    Returns:
        ``(new_m_K, new_m_C)`` as in the module docstring (scaled by ½, or by
        ½(1−α₁) with ``normalize_lr_cov``).
    """
    K_tK = K.from_inner()
    C_tC = C.from_inner()
    scale = 0.5 * (1.0 - hp.alpha1) if hp.normalize_lr_cov else 0.5
    # second terms first, in the fresh matrices KᵀK, CᵀC (H_K, H_C stay untouched);
    # methods rather than operators: torch.compile traces them (not * or @ on objects)
    if hp.kfac_like:
        # ½(λ KᵀK + H − I) with the ½ folded into the coefficients (exact: a power of 2;
        # with normalize_lr_cov the same to round-off): one operation less per factor
        new_m_K = K_tK.mul_(hp.damping * scale).add_(H_K, alpha=scale)
        new_m_C = C_tC.mul_(hp.damping * scale).add_(H_C, alpha=h_c_unscale * scale)
        return new_m_K.diag_add_(-scale), new_m_C.diag_add_(-scale)
    tr_H_C = H_C.average_trace()
    tr_H_K = H_K.average_trace()
    if not is_one(h_c_unscale):
        tr_H_C, tr_H_K = tr_H_C * h_c_unscale, tr_H_K * h_c_unscale
    c_squared = hp.damping * C_tC.average_trace()
    kappa_squared = hp.damping * K_tK.average_trace()
    # + tr(H)·H with the device scalar as a fused multiply-add (StructuredMatrix.add_)
    new_m_K = K_tK.mul_(c_squared).add_(H_K, alpha=tr_H_C)
    new_m_C = C_tC.mul_(kappa_squared).add_(H_C, alpha=tr_H_K)
    return new_m_K.diag_add_(-1.0).mul_(scale), new_m_C.diag_add_(-1.0).mul_(scale)


def update_factors(
    state: FactorState,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    hp: FactorHyperparams,
    h_c_unscale: Scalar = 1.0,
) -> FactorState:
    r"""One Riemannian step on :math:`(K, C, m_K, m_C)`; returns the new state.

    The inputs are not modified. With α₁ ≠ 0 the returned state carries the new
    momenta :math:`m \leftarrow \alpha_1 m + \text{new}`; with ``normalize_lr_cov``
    each factor's step size is :math:`\beta_1 / \max(1, \|m\|_\infty)`.
    """
    new_m_K, new_m_C = riemannian_gradients(state.K, state.C, H_K, H_C, hp, h_c_unscale)
    if hp.alpha1 != 0.0:
        if state.m_K is not None:
            new_m_K.add_(state.m_K, alpha=hp.alpha1)
        if state.m_C is not None:
            new_m_C.add_(state.m_C, alpha=hp.alpha1)

    def step(factor: StructuredMatrix, m: StructuredMatrix) -> StructuredMatrix:
        if hp.normalize_lr_cov:
            # β₁ / max(1, ‖m‖∞) stays on the device: reading the norm would synchronise
            norm = m.infinity_vector_norm().clamp_min(1.0)
            return factor.matmul(m).mul_(norm.reciprocal_().mul_(-hp.lr_cov)).add_(factor)
        # K − β₁ K m, written into the fresh product (same rounding as the subtraction)
        return factor.matmul(m).mul_(-hp.lr_cov).add_(factor)

    momentum = hp.alpha1 != 0.0
    return FactorState(
        K=step(state.K, new_m_K),
        C=step(state.C, new_m_C),
        m_K=new_m_K if momentum else None,
        m_C=new_m_C if momentum else None,
    )


def resolve_lr_cov(lr_cov: float | Callable[[int], float], step: int) -> float:
    """β₁ at ``step``: the float, or the schedule's value."""
    return float(lr_cov(step)) if callable(lr_cov) else float(lr_cov)
