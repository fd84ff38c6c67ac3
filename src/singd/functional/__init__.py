"""The update rules as pure functions (no hooks, no modules, no optimizer state)."""

from singd.functional.factors import (
    FactorHyperparams,
    FactorState,
    resolve_lr_cov,
    riemannian_gradients,
    update_factors,
)
from singd.functional.precondition import (
    apply_parameter_step,
    kfac_natural_gradient,
    kl_clip_factor,
    natural_gradient,
    parameter_step,
    parameter_step_,
    parameter_step_stays_finite,
)

__all__ = [
    "FactorHyperparams",
    "FactorState",
    "apply_parameter_step",
    "kfac_natural_gradient",
    "kl_clip_factor",
    "natural_gradient",
    "parameter_step",
    "parameter_step_",
    "parameter_step_stays_finite",
    "resolve_lr_cov",
    "riemannian_gradients",
    "update_factors",
]
