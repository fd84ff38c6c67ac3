"""Validation of hyper-parameters shared by the Kronecker optimizers.

Every invalid value raises an error that names the valid choices.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from singd.layers import KFAC_APPROXIMATIONS, LOSS_AVERAGES

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


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float32`` → ``"float32"`` (None stays None), for checkpoints."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {value}.")


def validate_common_group(group: dict[str, Any]) -> None:
    """Check and normalise the hyper-parameters every Kronecker optimizer has."""
    for key in ("lr", "momentum", "weight_decay", "damping", "lr_cov"):
        if key in group:
            check_nonnegative(key, group[key])
    T = group.get("T", 1)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T (the refresh interval) must be a positive integer, got {T!r}.")
    if group.get("kfac_approx") not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"Invalid kfac_approx {group.get('kfac_approx')!r}. Valid: {KFAC_APPROXIMATIONS}."
        )
    if group["fallback"] not in FALLBACK_RULES:
        raise ValueError(f"Invalid fallback {group['fallback']!r}. Valid: {FALLBACK_RULES}.")
    betas = group["fallback_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2) or not all(
        isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas
    ):
        raise ValueError(f"fallback_betas must be two numbers in [0, 1), got {betas!r}.")
    group["fallback_betas"] = tuple(float(b) for b in betas)
    check_nonnegative("fallback_eps", group["fallback_eps"])
    if group["kl_clip"] is not None:
        check_nonnegative("kl_clip", group["kl_clip"])
    if group.get("loss_average") not in LOSS_AVERAGES:
        raise ValueError(
            f"Invalid loss_average {group.get('loss_average')!r}. Valid: {LOSS_AVERAGES}."
        )
