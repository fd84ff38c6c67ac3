r"""Validation of the hyper-parameters of the Kronecker optimizers, with their bounds as data.

Every invalid value raises an error that names the valid choices. The bounds live in
one table (:data:`BOUNDS`, with the KFAC-specific entries in :data:`KFAC_BOUNDS`) that
the library (``SINGD``, ``KFAC``, their param groups and checkpoints) and the ``singd``
command (:mod:`singd.cli.options`) both read, so the two never disagree.

Where the bounds come from (paper symbols; the update rule is in
:mod:`singd.functional.factors`, spec §1.5):

* **α₂ (``momentum``) and α₁ (``alpha1``) in [0, 1).** Both are heavy-ball momenta,
  :math:`m \leftarrow \alpha m + \text{new}`, so :math:`m_t = \sum_s \alpha^{t-s}\,
  \text{new}_s`: for α ≥ 1 the weights of old terms never decay and the sum grows
  without bound (the issue's momentum 1.5 was NaN by step 95, α₁ = 2 by step 10).
* **λ (``damping``) > 0, finite.** SINGD's fixed point is
  :math:`K K^\top = (\overline{\mathrm{Tr}}(H_C)\,U + \lambda\,\overline{\mathrm{Tr}}(C^\top C)\,
  I)^{-1}`; with λ = 0 it does not exist where :math:`U` is rank-deficient (a batch
  smaller than :math:`d_i`), and K grows without bound there. KFAC inverts
  :math:`S + \lambda I`, singular for λ = 0 and singular :math:`S`.
* **β₁ (``lr_cov``), SINGD/INGD: 0 ≤ β₁ < 1 + α₁; IKFAC (``kfac_like``): 0 ≤ β₁ < 2.**
  Write :math:`X = K^\top S K` for the matrix whose fixed point is :math:`I`. One
  refresh maps :math:`X \mapsto (I - \beta_1 m)^\top X (I - \beta_1 m)` with
  :math:`m = \tfrac12(X - I)` (+ α₁ × the old m). Linearised at :math:`X = I + E`:
  :math:`E \mapsto E - 2\beta_1 m`, with :math:`2m = \alpha_1 (2m_{\text{old}}) + E` —
  heavy-ball with step β₁ on unit curvature, stable iff β₁ < 2(1 + α₁). In
  SINGD/INGD the trace coupling (:math:`\overline{\mathrm{Tr}}(H_C)` in K's update,
  :math:`\overline{\mathrm{Tr}}(H_K)` in C's) moves K and C by the same factor along the
  trace direction, which doubles the step there: :math:`E \mapsto E - 4\beta_1 m`,
  stable iff β₁ < 1 + α₁. IKFAC (α₁ = 0, no trace coupling): β₁ < 2. Beyond the bound
  the factors oscillate with growing amplitude (the issue's 1e30 was NaN in 3 steps);
  ``tests/test_validation.py`` runs the update on both sides of it.
* **β₁ and λ together: β₁ (λ − 1) < 2** (SINGD family, without ``normalize_lr_cov``).
  At the first refresh :math:`K = C = I`, so :math:`m_K = \tfrac12(\overline{\mathrm{Tr}}
  (G)\,U + (\lambda - 1) I)` has every eigenvalue ≥ (λ − 1)/2 (:math:`U` is PSD; the
  same for :math:`m_C` and for IKFAC). :math:`K \leftarrow K(I - \beta_1 m_K)` keeps K
  invertible (and its orientation) only if every eigenvalue of :math:`\beta_1 m_K` is
  below 1: β₁ (λ − 1)/2 < 1 is necessary whatever the data. (λ = 1000 at the default
  β₁ = 0.01 gives 9.99: the issue's divergence in 3 steps.) The data term can only add
  to m, so this bound is necessary, not sufficient: the step guard
  (:mod:`singd.optim.guard`) catches what the data does at run time. With
  ``normalize_lr_cov`` the step is :math:`\beta_1 / \max(1, \|m\|_\infty)`, which keeps
  :math:`\beta_1 |m_{ij}|` ≤ β₁, so only the per-value bound applies.
* **β₁ for KFAC in [0, 1].** It is the weight of the EMA
  :math:`S \leftarrow (1-\beta_1) S + \beta_1 U`, which stays PSD for β₁ ≤ 1 only.
* **β₂ (``lr``) and γ (``weight_decay``) ≥ 0, finite**, as in ``torch.optim``.
* **``kl_clip`` > 0, finite, or None.** The natural gradients are scaled by
  :math:`\nu = \min(1, \sqrt{c / \ldots})`; c = 0 gives ν = 0, which freezes every
  preconditioned layer without a word.
* **``fallback_eps`` (AdamW's ε) > 0.** With ε = 0 a parameter whose gradient is 0
  from the start gets 0/0.
* **``fallback_betas`` in [0, 1)** (momenta, as above). **``T`` an integer ≥ 1.**
  **``init_grad_scale`` > 0, finite.**

Values must be finite everywhere (inf and NaN are refused), numbers must be real
numbers (``bool`` and strings are refused with a ``TypeError``). A callable
``lr_cov`` is checked when it is called (:func:`resolve_lr_cov`), at each refresh.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from singd.config import dtype_name as dtype_name  # (re-exported: its old home)
from singd.config import plain
from singd.layers import KFAC_APPROXIMATIONS, LOSS_AVERAGES
from singd.optim.fallback import available_fallbacks

#: The built-in fallback rules (more can be registered: :mod:`singd.optim.fallback`).
FALLBACK_RULES = ("adamw", "sgd", None)

#: Defaults of the fallback's own hyper-parameters (per param group). The fallback
#: also reads the group's ``lr`` and ``weight_decay`` (decoupled for AdamW, coupled
#: for SGD) and ``momentum`` (SGD), so LR schedulers drive it like the rest.
FALLBACK_DEFAULTS: dict[str, Any] = {
    "fallback": "adamw",
    "fallback_betas": (0.9, 0.999),
    "fallback_eps": 1e-8,
}

DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}


@dataclasses.dataclass(frozen=True)
class Bound:
    """The valid range of one hyper-parameter: ``low`` ≤ (or <) value < (or ≤) ``high``.

    Attributes:
        name: The argument name (``"momentum"``).
        symbol: The paper's symbol (``"α₂"``), for messages.
        low: Lower end.
        high: Upper end (``math.inf``: none; values must be finite anyway).
        low_open: True if ``low`` itself is excluded (``> low``).
        high_open: True if ``high`` itself is excluded (``< high``).
        integer: Whether the value must be an integer.
        why: What goes wrong outside (shown in the error).
    """

    name: str
    symbol: str
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    integer: bool = False
    why: str = ""

    def describe(self) -> str:
        """The range in words: ``"a number in [0, 1)"``, ``"a number > 0"``, …"""
        kind = "an integer" if self.integer else "a number"
        low = f"{self.low:g}"
        if self.high == math.inf:
            return f"{kind} {'>' if self.low_open else '≥'} {low}"
        high = f"{self.high:g}"
        return (
            f"{kind} in {'(' if self.low_open else '['}{low}, "
            f"{high}{')' if self.high_open else ']'}"
        )

    def contains(self, value: float) -> bool:
        """Whether a (finite, real) value is in range."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def check(self, value: Any, where: str = "") -> Any:
        """Return ``value`` if valid, else raise a clear error.

        Raises:
            TypeError: For a non-number (``bool`` and strings included).
            ValueError: For a number out of range, inf or NaN.
        """
        label = f"{self.name} ({self.symbol})" if self.symbol else self.name
        if where:
            label = f"{label} {where}"
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
            value = value.item()  # (a 0-dim tensor lr, as torch.optim accepts)
        wanted = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise TypeError(f"{label} must be {self.describe()}, got {value!r}.")
        if not math.isfinite(value) or not self.contains(float(value)):
            reason = f" ({self.why})" if self.why else ""
            raise ValueError(f"{label} must be {self.describe()}, got {value!r}{reason}.")
        return value


def _momentum(name: str, symbol: str, buffer: str) -> Bound:
    return Bound(
        name,
        symbol,
        0.0,
        1.0,
        why=f"for {symbol} ≥ 1 the {buffer} sums past terms without decay and grows without bound",
    )


#: The bounds of every numeric hyper-parameter of SINGD (and of what KFAC shares with
#: it; :data:`KFAC_BOUNDS` overrides ``lr_cov``). See the module docstring for why.
BOUNDS: dict[str, Bound] = {
    b.name: b
    for b in (
        Bound("lr", "β₂", 0.0, why="a negative learning rate ascends the loss"),
        _momentum("momentum", "α₂", "momentum buffer"),
        Bound("weight_decay", "γ", 0.0),
        Bound(
            "damping",
            "λ",
            0.0,
            low_open=True,
            why="without damping the factors have no fixed point where the curvature is "
            "rank-deficient",
        ),
        Bound(
            "lr_cov",
            "β₁",
            0.0,
            2.0,
            why="the factor update K ← K(I − β₁ m) diverges for β₁ ≥ 2 (and for β₁ ≥ 1 + α₁ "
            "unless kfac_like=True)",
        ),
        _momentum("alpha1", "α₁", "Riemannian momentum m_K, m_C"),
        Bound("T", "", 1.0, integer=True, why="the refresh interval counts steps"),
        Bound(
            "kl_clip",
            "",
            0.0,
            low_open=True,
            why="kl_clip=0 scales every natural gradient by 0; use None for no clipping",
        ),
        Bound(
            "fallback_eps",
            "AdamW ε",
            0.0,
            low_open=True,
            why="ε = 0 divides 0 by 0 for a gradient that is 0",
        ),
        Bound("fallback_beta", "AdamW β", 0.0, 1.0),
        Bound("init_grad_scale", "s₋₁", 0.0, low_open=True),
    )
}

#: KFAC's β₁ is the weight of an exponential moving average.
KFAC_BOUNDS: dict[str, Bound] = {
    **BOUNDS,
    "lr_cov": Bound(
        "lr_cov",
        "β₁",
        0.0,
        1.0,
        high_open=False,
        why="the EMA S ← (1−β₁)S + β₁U loses positive definiteness for β₁ > 1",
    ),
}


def check_bound(name: str, value: Any, *, table: Mapping[str, Bound] = BOUNDS) -> Any:
    """Check one hyper-parameter against its :class:`Bound` in ``table``; return it."""
    return table[name].check(value)


def check_factor_step(
    lr_cov: float, damping: float, alpha1: float, *, kfac_like: bool, normalize_lr_cov: bool
) -> None:
    r"""The joint bounds of SINGD's factor step (module docstring).

    * β₁ < 1 + α₁ (trace-coupled SINGD/INGD) or β₁ < 2 (IKFAC): linear stability of
      :math:`K \leftarrow K(I - \beta_1 m)` at its fixed point;
    * β₁ (λ − 1) < 2 without ``normalize_lr_cov``: K stays invertible at the first
      refresh (K = C = I) whatever the data.

    Raises:
        ValueError: Naming both values and the bound.
    """
    limit = 2.0 if kfac_like else 1.0 + alpha1
    if lr_cov >= limit:
        which = "kfac_like=True" if kfac_like else f"alpha1 (α₁) = {alpha1:g}"
        raise ValueError(
            f"lr_cov (β₁) must be below {limit:g} with {which}, got {lr_cov:g}: beyond it the "
            "factor update K ← K(I − β₁ m) oscillates with growing amplitude instead of "
            "converging (stable for β₁ < 1 + α₁; with kfac_like=True, β₁ < 2)."
        )
    if not normalize_lr_cov and lr_cov * (damping - 1.0) >= 2.0:
        raise ValueError(
            f"lr_cov (β₁) = {lr_cov:g} and damping (λ) = {damping:g} give β₁(λ − 1) = "
            f"{lr_cov * (damping - 1.0):g}; it must be below 2, or the first factor update "
            "K ← K(I − β₁ m_K) makes K singular or flips it (m_K has eigenvalues ≥ (λ − 1)/2 "
            f"at K = I). Use a smaller lr_cov (below {2.0 / (damping - 1.0):.3g}), a smaller "
            "damping, or normalize_lr_cov=True."
        )


def parse_dtype(dtype: torch.dtype | str | None, what: str) -> torch.dtype | None:
    """Accept a dtype, its name, or None; raise a clear error otherwise."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"Invalid {what} {dtype!r}. Valid: None, {', '.join(DTYPES)}.")


def check_nonnegative(name: str, value: Any) -> None:
    """Numbers must be finite and ≥ 0 (callables are checked when called)."""
    if callable(value):
        return
    Bound(name, "", 0.0).check(value)


def check_bool(name: str, value: Any) -> bool:
    """Flags must be ``True`` or ``False`` (not ``'no'``, not 0)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_grad_scaler(grad_scaler: Any) -> None:
    """``grad_scaler`` must be None or a ``torch.amp.GradScaler`` (or act like one).

    Raises:
        TypeError: Naming what was passed and what is expected.
    """
    if grad_scaler is None or isinstance(grad_scaler, torch.amp.GradScaler):
        return
    if all(callable(getattr(grad_scaler, m, None)) for m in ("is_enabled", "get_scale")):
        return  # a scaler with GradScaler's interface (e.g. a wrapper)
    raise TypeError(
        f"grad_scaler must be None or a torch.amp.GradScaler, got {type(grad_scaler).__name__} "
        f"({grad_scaler!r}). Pass the GradScaler of your training loop, e.g. "
        "scaler = torch.amp.GradScaler(); SINGD(model, grad_scaler=scaler)."
    )


def resolve_lr_cov(
    lr_cov: float | Callable[[int], float], step: int, *, table: Mapping[str, Bound] = BOUNDS
) -> float:
    """β₁ at ``step``: the number, or the schedule's value, checked against its bound.

    Raises:
        TypeError: If a schedule returns something that is not a number.
        ValueError: If the value is out of range.
    """
    if not callable(lr_cov):
        return float(table["lr_cov"].check(lr_cov))
    where = f"returned by the lr_cov schedule at step {step}"
    return float(table["lr_cov"].check(lr_cov(step), where=where))


def _check_lr_cov(group: Mapping[str, Any], table: Mapping[str, Bound]) -> None:
    lr_cov = group["lr_cov"]
    if callable(lr_cov):
        return  # checked at each refresh, when it is called
    table["lr_cov"].check(lr_cov)


def validate_common_group(group: dict[str, Any], table: Mapping[str, Bound] = BOUNDS) -> None:
    """Check and normalise the hyper-parameters every Kronecker optimizer has.

    Args:
        group: A param group (hyper-parameters by name).
        table: The bounds (:data:`BOUNDS`, or :data:`KFAC_BOUNDS` for KFAC).

    Raises:
        TypeError: For values of the wrong type.
        ValueError: For values out of range or unknown names (naming the valid ones).

    Enum members (:mod:`singd.config`) are stored as their plain values.
    """
    for key in ("kfac_approx", "loss_average", "fallback"):
        if key in group:
            group[key] = plain(group[key])
    for key in ("lr", "momentum", "weight_decay", "damping"):
        if key in group:
            table[key].check(group[key])
    if "lr_cov" in group:
        _check_lr_cov(group, table)
    table["T"].check(group.get("T", 1))
    if group.get("kfac_approx") not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"Invalid kfac_approx {group.get('kfac_approx')!r}. Valid: {KFAC_APPROXIMATIONS}."
        )
    if group["fallback"] not in available_fallbacks():
        raise ValueError(f"Invalid fallback {group['fallback']!r}. Valid: {available_fallbacks()}.")
    betas = group["fallback_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"fallback_betas must be two numbers in [0, 1), got {betas!r}.")
    for beta in betas:
        table["fallback_beta"].check(beta)
    group["fallback_betas"] = tuple(float(b) for b in betas)
    table["fallback_eps"].check(group["fallback_eps"])
    if group["kl_clip"] is not None:
        table["kl_clip"].check(group["kl_clip"])
    if group.get("loss_average") not in LOSS_AVERAGES:
        raise ValueError(
            f"Invalid loss_average {group.get('loss_average')!r}. Valid: {LOSS_AVERAGES}."
        )
