r"""Theorem 1 (spec §2): IKFAC tracks KFAC to first order in β₁.

Start both from matching factors, :math:`K K^\top = (S_K + \lambda I)^{-1}` and
:math:`C C^\top = (S_C + \lambda I)^{-1}`, and refresh once with the same
statistics :math:`U = A^\top A`, :math:`G = G_m^\top G_m` (dense, ``kfac_like=True``,
α₁ = 0, T = 1, float64). Then

.. math::
    e(\beta_1) = \frac{\|K_+ K_+^\top - (S_{K,+} + \lambda I)^{-1}\|_F}
                      {\|(S_{K,+} + \lambda I)^{-1}\|_F} = O(\beta_1^2),

so the log-log slope of :math:`e` over β₁ ∈ {1e-1, …, 1e-3} is ≈ 2 (likewise for C
and for the preconditioned gradients). Dropping the ½ of the IKFAC update makes the
first-order terms differ by a factor of two (slope ≈ 1); the same check rejects
that variant, which shows that it discriminates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from singd import KFAC, SINGD
from singd.functional import (
    FactorHyperparams,
    FactorState,
    kfac_natural_gradient,
    natural_gradient,
    riemannian_gradients,
    update_factors,
)
from singd.functional.kfac import damped_inverse, ema_update
from singd.structures import StructuredMatrix, parse_structure
from tests.tolerances import THEOREM1_SLOPE

F64 = torch.float64
BETAS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3]
DAMPING = 0.1
DENSE = parse_structure("dense")


def log_log_slope(betas: list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) over log(β₁)."""
    x, y = torch.tensor(betas, dtype=F64).log(), torch.tensor(errors, dtype=F64).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def in_bound(slope: float) -> bool:
    """Whether the slope is second order (Theorem 1)."""
    low, high = THEOREM1_SLOPE
    return low <= slope <= high


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """Relative Frobenius error."""
    return float((actual - expected).norm() / expected.norm())


def random_spd(d: int, gen: torch.Generator) -> Tensor:
    """A well-conditioned random SPD matrix."""
    X = torch.randn(d, 2 * d, generator=gen, dtype=F64)
    return X @ X.T / (2 * d) + 0.1 * torch.eye(d, dtype=F64)


class Setup:
    """Statistics, KFAC's S and the matching dense IKFAC factors for one layer."""

    def __init__(self, d_K: int = 6, d_C: int = 4, n: int = 10, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.A = torch.randn(n, d_K, generator=gen, dtype=F64) / n**0.5
        self.Gm = torch.randn(n, d_C, generator=gen, dtype=F64) / n**0.5
        self.S_K, self.S_C = random_spd(d_K, gen), random_spd(d_C, gen)
        self.grad = torch.randn(d_C, d_K, generator=gen, dtype=F64)  # Ĝ = [∇W | ∇b]
        # K = chol((S_K + λI)⁻¹): lower triangular, so K is *not* symmetric.
        self.K = DENSE.from_tensors(d_K, {"mat": self.chol_inverse(self.S_K)})
        self.C = DENSE.from_tensors(d_C, {"mat": self.chol_inverse(self.S_C)})

    @staticmethod
    def chol_inverse(S: Tensor) -> Tensor:
        """:math:`L` with :math:`L L^\\top = (S + \\lambda I)^{-1}`."""
        return torch.linalg.cholesky(damped_inverse(S, DAMPING, F64))

    def curvatures(self) -> tuple[StructuredMatrix, StructuredMatrix]:
        """:math:`H_K = K^\\top U K` and :math:`H_C = C^\\top G C`."""
        return self.K.from_inner(self.A.T), self.C.from_inner(self.Gm.T)

    def kfac(self, beta1: float) -> tuple[Tensor, Tensor]:
        """KFAC's damped inverses after one EMA refresh."""
        S_K = ema_update(self.S_K, self.A.T @ self.A, beta1)
        S_C = ema_update(self.S_C, self.Gm.T @ self.Gm, beta1)
        return damped_inverse(S_K, DAMPING, F64), damped_inverse(S_C, DAMPING, F64)


def hyperparams(beta1: float, kfac_like: bool = True) -> FactorHyperparams:
    """IKFAC (or INGD) hyper-parameters of the theorem: α₁ = 0, no normalisation."""
    return FactorHyperparams(
        lr_cov=beta1, damping=DAMPING, alpha1=0.0, kfac_like=kfac_like, normalize_lr_cov=False
    )


def library_update(setup: Setup, beta1: float) -> FactorState:
    """One IKFAC refresh by ``singd.functional.update_factors``."""
    H_K, H_C = setup.curvatures()
    return update_factors(FactorState(K=setup.K, C=setup.C), H_K, H_C, hyperparams(beta1))


def update_without_half(setup: Setup, beta1: float) -> FactorState:
    r"""The variant whose update drops the ½: :math:`K (I - \beta_1 \cdot 2 m_K)`."""
    H_K, H_C = setup.curvatures()
    m_K, m_C = riemannian_gradients(setup.K, setup.C, H_K, H_C, hyperparams(beta1))
    return FactorState(
        K=setup.K - setup.K @ m_K * (2 * beta1), C=setup.C - setup.C @ m_C * (2 * beta1)
    )


def ingd_update(setup: Setup, beta1: float) -> FactorState:
    """One INGD refresh (trace coupling, adaptive damping): not covered by the theorem."""
    H_K, H_C = setup.curvatures()
    return update_factors(
        FactorState(K=setup.K, C=setup.C), H_K, H_C, hyperparams(beta1, kfac_like=False)
    )


def factor_errors(
    update: Callable[[Setup, float], FactorState], setup: Setup
) -> dict[str, list[float]]:
    """e(β₁) of K Kᵀ, C Cᵀ and the preconditioned gradient for every β₁ in ``BETAS``."""
    errors: dict[str, list[float]] = {"K": [], "C": [], "natural gradient": []}
    for beta1 in BETAS:
        state = update(setup, beta1)
        P_K, P_C = setup.kfac(beta1)
        K, C = state.K.to_dense(), state.C.to_dense()
        errors["K"].append(rel_error(K @ K.T, P_K))
        errors["C"].append(rel_error(C @ C.T, P_C))
        expected = kfac_natural_gradient(P_K, P_C, setup.grad)
        errors["natural gradient"].append(
            rel_error(natural_gradient(state.K, state.C, setup.grad), expected)
        )
    return errors


def test_factors_match_before_the_refresh() -> None:
    """The premise: K Kᵀ = (S_K + λI)⁻¹ and C Cᵀ = (S_C + λI)⁻¹ (and K is not symmetric)."""
    setup = Setup()
    K, C = setup.K.to_dense(), setup.C.to_dense()
    assert rel_error(K @ K.T, damped_inverse(setup.S_K, DAMPING, F64)) < 1e-12
    assert rel_error(C @ C.T, damped_inverse(setup.S_C, DAMPING, F64)) < 1e-12
    assert rel_error(K, K.T) > 0.1


def test_ikfac_is_kfac_to_first_order() -> None:
    """Slope 2 for K Kᵀ, C Cᵀ and the natural gradient (``update_factors``)."""
    for seed in range(3):
        for name, errors in factor_errors(library_update, Setup(seed=seed)).items():
            slope = log_log_slope(BETAS, errors)
            assert in_bound(slope), f"seed {seed}, {name}: slope {slope:.3f}, errors {errors}"


def test_check_rejects_update_without_half() -> None:
    """Without the ½ the error is first order (slope ≈ 1): the check fails, as it must."""
    for name, errors in factor_errors(update_without_half, Setup()).items():
        slope = log_log_slope(BETAS, errors)
        assert not in_bound(slope), f"{name}: slope {slope:.3f} despite the missing ½"
        assert abs(slope - 1.0) < 0.2, f"{name}: slope {slope:.3f}"


def test_ingd_is_not_kfac() -> None:
    """INGD's trace coupling and adaptive damping change the first-order term."""
    for name, errors in factor_errors(ingd_update, Setup()).items():
        slope = log_log_slope(BETAS, errors)
        assert not in_bound(slope), f"{name}: INGD slope {slope:.3f}"


def test_optimizers_agree_to_first_order() -> None:
    """End to end: ``singd.SINGD`` (IKFAC) vs ``singd.KFAC`` after one step.

    Both optimizers get matching factors through ``load_state_dict`` and take one
    step on the same batch (lr = 1, no momentum, no weight decay), so the parameter
    change is minus the natural gradient; its relative difference and that of
    K Kᵀ vs P_K, C Cᵀ vs P_C are O(β₁²).
    """
    torch.manual_seed(0)
    base = nn.Linear(5, 3).double()
    X, Y = torch.randn(8, 5, dtype=F64), torch.randn(8, 3, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    S_K, S_C = random_spd(6, gen), random_spd(3, gen)
    errors: dict[str, list[float]] = {"K": [], "C": [], "update": []}
    for beta1 in BETAS:
        kw = {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "damping": DAMPING, "T": 1}
        singd_model, kfac_model = copy.deepcopy(base), copy.deepcopy(base)
        singd = SINGD(singd_model, kfac_like=True, alpha1=0.0, lr_cov=beta1, **kw)
        kfac = KFAC(kfac_model, lr_cov=beta1, inverse_dtype=F64, **kw)
        singd.factors("")  # allocate, then overwrite through the checkpoint path
        state = singd.state_dict()
        state["singd"]["layers"][""]["K.mat"] = Setup.chol_inverse(S_K)
        state["singd"]["layers"][""]["C.mat"] = Setup.chol_inverse(S_C)
        singd.load_state_dict(state)
        state = kfac.state_dict()
        layer = state["kfac"]["layers"][""]
        layer["S_K"], layer["S_C"] = S_K, S_C
        layer["P_K"] = damped_inverse(S_K, DAMPING, F64)
        layer["P_C"] = damped_inverse(S_C, DAMPING, F64)
        kfac.load_state_dict(state)
        deltas = []
        for model, opt in ((singd_model, singd), (kfac_model, kfac)):
            before = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
            opt.zero_grad()
            (0.5 * ((model(X) - Y) ** 2).sum(-1).mean()).backward()
            opt.step()
            deltas.append(
                torch.cat([model.weight.detach().flatten(), model.bias.detach()]) - before
            )
        K, C = singd.factors("").K.to_dense(), singd.factors("").C.to_dense()
        errors["K"].append(rel_error(K @ K.T, kfac.layer_state("")["P_K"]))
        errors["C"].append(rel_error(C @ C.T, kfac.layer_state("")["P_C"]))
        errors["update"].append(rel_error(deltas[0], deltas[1]))
    for name, errs in errors.items():
        slope = log_log_slope(BETAS, errs)
        assert in_bound(slope), f"{name}: slope {slope:.3f}, errors {errs}"
