"""The hyper-parameter bounds (:mod:`singd.optim.validation`): derived, shared, explained.

* the bounds on β₁ are where the factor update stops converging (run on both sides);
* the joint bound β₁(λ − 1) < 2 is where the first refresh makes K singular;
* the library and the ``singd`` command accept exactly the same values;
* every refusal is a clear error naming the valid range (issue 14, items 5 and 9).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.cli.optimizers import OptimizerSpec
from singd.cli.options import HYPERPARAMETER_KEYS, bounded
from singd.functional import FactorHyperparams, FactorState, update_factors
from singd.optim.validation import BOUNDS, KFAC_BOUNDS, check_factor_step
from singd.structures import parse_structure

F64 = torch.float64
DENSE = parse_structure("dense")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


# --- the bounds are where the update rule stops working -------------------------------


def fixed_point_error(beta1: float, alpha1: float, kfac_like: bool, refreshes: int = 120) -> float:
    r"""max |X − I| after ``refreshes`` factor updates on fixed statistics (float64).

    :math:`X = K^\top(\overline{Tr}(H_C) U + \lambda \overline{Tr}(C^\top C) I) K` for
    SINGD/INGD and :math:`K^\top(U + \lambda I)K` for IKFAC: the matrix whose fixed
    point is I. inf if the factors blow up.
    """
    torch.manual_seed(0)
    d_i, d_o, damping = 4, 3, 0.1
    A = torch.randn(32, d_i, dtype=F64) / 32**0.5
    Gm = 0.5 * torch.randn(32, d_o, dtype=F64) / 32**0.5
    U, G, eye = A.T @ A, Gm.T @ Gm, torch.eye(d_i, dtype=F64)
    state = FactorState(K=DENSE.eye(d_i, dtype=F64), C=DENSE.eye(d_o, dtype=F64))
    if alpha1:
        state.m_K, state.m_C = DENSE.zeros(d_i, dtype=F64), DENSE.zeros(d_o, dtype=F64)
    hp = FactorHyperparams(beta1, damping, alpha1, kfac_like, normalize_lr_cov=False)
    for _ in range(refreshes):
        state = update_factors(state, state.K.from_inner(A.T), state.C.from_inner(Gm.T), hp)
    K, C = state.K.to_dense(), state.C.to_dense()
    if kfac_like:
        S = U + damping * eye
    else:
        S = torch.trace(C.T @ G @ C) / d_o * U + damping * torch.trace(C.T @ C) / d_o * eye
    error = float((K.T @ S @ K - eye).abs().max())
    return error if math.isfinite(error) else math.inf


@pytest.mark.parametrize(
    ("alpha1", "kfac_like", "limit"),
    [(0.0, False, 1.0), (0.5, False, 1.5), (0.0, True, 2.0)],
    ids=["INGD α₁=0: β₁<1", "INGD α₁=0.5: β₁<1.5", "IKFAC: β₁<2"],
)
def test_lr_cov_bound_is_where_the_factor_update_stops_converging(
    alpha1: float, kfac_like: bool, limit: float
) -> None:
    """10% inside the bound the factors converge to their fixed point; 10% outside they don't."""
    assert fixed_point_error(0.9 * limit, alpha1, kfac_like) < 1e-6
    assert fixed_point_error(1.1 * limit, alpha1, kfac_like) > 1e-2
    check_factor_step(0.9 * limit, 0.1, alpha1, kfac_like=kfac_like, normalize_lr_cov=False)
    with pytest.raises(ValueError, match=rf"lr_cov \(β₁\) must be below {limit:g}"):
        check_factor_step(1.1 * limit, 0.1, alpha1, kfac_like=kfac_like, normalize_lr_cov=False)


@pytest.mark.parametrize("kfac_like", [False, True])
def test_lr_cov_times_damping_bound_is_where_the_first_refresh_makes_K_singular(
    kfac_like: bool,
) -> None:
    """Without data (U = G = 0) at K = C = I, K ← (1 − β₁(λ − 1)/2) K: singular at the bound."""
    damping = 41.0  # β₁(λ − 1) = 2 at β₁ = 0.05
    zero_K, zero_C = DENSE.zeros(3, dtype=F64), DENSE.zeros(2, dtype=F64)
    smallest = {}
    for beta1 in (0.99 * 0.05, 1.01 * 0.05):
        state = FactorState(K=DENSE.eye(3, dtype=F64), C=DENSE.eye(2, dtype=F64))
        hp = FactorHyperparams(beta1, damping, 0.0, kfac_like, normalize_lr_cov=False)
        new = update_factors(state, zero_K, zero_C, hp)
        smallest[beta1] = float(torch.linalg.eigvals(new.K.to_dense()).real.min())
        assert torch.allclose(
            new.K.to_dense(), (1 - beta1 * (damping - 1) / 2) * torch.eye(3, dtype=F64)
        )
    below, above = smallest.values()
    assert below > 0 > above
    with pytest.raises(ValueError, match=r"β₁\(λ − 1\) = 2.02; it must be below 2"):
        SINGD(small_model(), lr_cov=1.01 * 0.05, damping=damping, kfac_like=kfac_like, alpha1=0.0)
    SINGD(small_model(), lr_cov=0.99 * 0.05, damping=damping, kfac_like=kfac_like, alpha1=0.0)
    SINGD(small_model(), lr_cov=1.01 * 0.05, damping=damping, normalize_lr_cov=True)
    KFAC(small_model(), lr_cov=0.5, damping=1000.0)  # (KFAC has no such coupling)


# --- one table for the library and the command ----------------------------------------

PROBES: list[Any] = [-1.0, 0.0, 0.5, 1.0, 1.5, 1.99, 2.0, 3.0, 1e30, math.inf, math.nan]


def library_accepts(name: str, value: Any) -> bool:
    kwargs = {name: int(value) if name == "T" and math.isfinite(value) else value}
    # the per-value bound alone, without the joint ones of check_factor_step
    if name == "lr_cov" and value == value and value < 2:
        kwargs.update(kfac_like=True, alpha1=0.0)
    if name == "damping":
        kwargs.update(normalize_lr_cov=True)
    try:
        SINGD(small_model(), **kwargs)
    except (TypeError, ValueError):
        return False
    return True


def cli_accepts(name: str, value: Any) -> bool:
    try:
        bounded(name)(str(int(value)) if name == "T" and math.isfinite(value) else str(value))
    except argparse.ArgumentTypeError:
        return False
    return True


@pytest.mark.filterwarnings("ignore:kfac_like=True")
@pytest.mark.parametrize("name", HYPERPARAMETER_KEYS)
def test_the_command_accepts_what_the_library_accepts(name: str) -> None:
    for value in PROBES:
        if name == "T" and math.isfinite(value) and value != int(value):
            continue  # (the command parses T as an integer)
        assert cli_accepts(name, value) == library_accepts(name, value), (name, value)


def test_the_command_checks_the_joint_and_kfac_bounds_with_the_library_table() -> None:
    with pytest.raises(ValueError, match=r"β₁\(λ − 1\) = 9.99"):
        OptimizerSpec("singd", "diagonal", {"damping": 1000.0, "lr_cov": 0.01})
    with pytest.raises(ValueError, match=r"lr_cov \(β₁\) must be below 1.5"):
        OptimizerSpec("ingd", hyperparameters={"lr_cov": 1.7})
    OptimizerSpec("ikfac", hyperparameters={"lr_cov": 1.7})  # IKFAC: β₁ < 2
    with pytest.raises(ValueError, match=r"lr_cov \(β₁\) must be a number in \[0, 1\]"):
        OptimizerSpec("kfac", hyperparameters={"lr_cov": 1.5})
    assert KFAC_BOUNDS["lr_cov"].contains(1.0) and not BOUNDS["lr_cov"].contains(2.0)


# --- clear errors (issue 14, items 5 and 9) -------------------------------------------


def lr_cov_schedule_returning_text(step: int) -> Any:
    return "fast"


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"momentum": 1.5}, ValueError, r"momentum \(α₂\) must be a number in \[0, 1\), got 1.5"),
    ({"alpha1": 2}, ValueError, r"alpha1 \(α₁\) must be a number in \[0, 1\), got 2"),
    ({"alpha1": 1e30}, ValueError, r"alpha1 \(α₁\) must be a number in \[0, 1\)"),
    ({"momentum": 1e30}, ValueError, r"momentum \(α₂\) must be a number in \[0, 1\)"),
    ({"damping": 1e30}, ValueError, r"β₁\(λ − 1\) = 1e\+28; it must be below 2"),
    ({"damping": 0.0}, ValueError, r"damping \(λ\) must be a number > 0, got 0.0"),
    ({"damping": 1000.0}, ValueError, r"below 0.002"),
    ({"lr_cov": 1e30}, ValueError, r"lr_cov \(β₁\) must be a number in \[0, 2\)"),
    ({"lr_cov": 1.6}, ValueError, r"lr_cov \(β₁\) must be below 1.5 with alpha1 \(α₁\) = 0.5"),
    ({"kl_clip": 0}, ValueError, r"kl_clip must be a number > 0, got 0 \(kl_clip=0 scales"),
    ({"fallback_eps": 0.0}, ValueError, r"fallback_eps \(AdamW ε\) must be a number > 0"),
    ({"fallback_betas": (0.9, 1.0)}, ValueError, r"fallback_beta \(AdamW β\) must be .*\[0, 1\)"),
    ({"grad_scaler": object()}, TypeError, r"grad_scaler must be None or a torch.amp.GradScaler"),
    ({"init_grad_scale": "1"}, TypeError, r"init_grad_scale \(s₋₁\) must be a number > 0"),
    ({"init_grad_scale": None}, TypeError, r"init_grad_scale \(s₋₁\) must be a number > 0"),
    ({"structures": None}, ValueError, r"structures must be a pair .* got None"),
    ({"warn_unsupported": "no"}, TypeError, r"warn_unsupported must be True or False, got 'no'"),
    ({"normalize_lr_cov": 1}, TypeError, r"normalize_lr_cov must be True or False"),
    ({"T": True}, TypeError, r"T must be an integer ≥ 1, got True"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_hyperparameters_get_clear_errors(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SINGD(small_model(), **kwargs)


def test_kfac_bounds() -> None:
    with pytest.raises(ValueError, match=r"lr_cov \(β₁\) must be a number in \[0, 1\], got 1.5"):
        KFAC(small_model(), lr_cov=1.5)
    with pytest.raises(ValueError, match=r"damping \(λ\) must be a number > 0"):
        KFAC(small_model(), damping=0.0)
    with pytest.raises(TypeError, match=r"grad_scaler must be None or a torch\.amp\.GradScaler"):
        KFAC(small_model(), grad_scaler="scaler")


@pytest.mark.parametrize("optimizer", [SINGD, KFAC])
@pytest.mark.parametrize(
    ("schedule", "error", "match"),
    [
        (lr_cov_schedule_returning_text, TypeError, "returned by the lr_cov schedule at step 0"),
        (lambda step: -0.1, ValueError, r"must be a number in \[0, 1?2?[\])], got -0.1"),
    ],
)
def test_an_lr_cov_schedule_returning_garbage_is_named(
    optimizer: type, schedule: Any, error: type[Exception], match: str
) -> None:
    model = small_model()
    optim = optimizer(model, lr_cov=schedule, T=1)
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(error, match=match):
        optim.step()


def test_an_lr_cov_schedule_is_checked_against_the_joint_bound() -> None:
    model = small_model()
    optim = SINGD(model, lr_cov=lambda step: 0.01, damping=1000.0, T=1)  # not called yet
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"β₁\(λ − 1\) = 9.99"):
        optim.step()


def test_the_guide_lists_the_bounds_of_the_table() -> None:
    """docs/guide.md's table of valid ranges says what BOUNDS checks."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in text.splitlines()
        if line.startswith("| `")
    }

    def cell(name: str) -> str:
        return next(valid for argument, valid in rows.items() if f"`{name}`" in argument)

    for name in ("lr", "weight_decay", "momentum", "alpha1", "damping", "fallback_eps", "T"):
        expected = BOUNDS[name].describe().removeprefix("a number ").removeprefix("an ")
        assert cell(name) == expected, name
    assert cell("kl_clip") == BOUNDS["kl_clip"].describe().removeprefix("a number ") + " or None"
    kfac_row = next(v for a, v in rows.items() if "`lr_cov`" in a and "KFAC" in a and "I" not in a)
    assert kfac_row == KFAC_BOUNDS["lr_cov"].describe().removeprefix("a number ")
