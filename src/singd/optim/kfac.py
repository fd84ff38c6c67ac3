r"""KFAC baseline with the same layers, hooks and statistics as SINGD (spec §1.2).

Exists so users and benchmarks can compare SINGD with KFAC in one API, and so
Theorem 1 (IKFAC ≈ KFAC to first order in β₁) can be tested. Statistics start at
:math:`S = I`; the EMA weight is β₁ = ``lr_cov``; inverses
:math:`(S+\lambda I)^{-1}` are computed every ``T`` steps in ``inverse_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from singd.config import KFACConfig, LayerPlan, dense_plan, dtype_name
from singd.distributed import Distributor
from singd.optim.base import KroneckerOptimizer, Layer
from singd.optim.validation import KFAC_BOUNDS, parse_dtype
from singd.preconditioners import KFACPreconditioner


class KFAC(KroneckerOptimizer):
    """Kronecker-factored approximate curvature with explicit damped inverses.

    Args:
        model: The model, or its ``DistributedDataParallel`` wrapper.
        params: As for :class:`~singd.SINGD`.
        lr: β₂.
        momentum: α₂.
        damping: λ, added to both factors before inversion.
        weight_decay: γ (coupled).
        T: Update statistics and inverses every ``T`` steps.
        loss_average: As for :class:`~singd.SINGD`.
        lr_cov: β₁, the EMA weight of the statistics (float or callable of the step).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        warn_unsupported: Warn about parameters KFAC does not train.
        factor_dtype: Dtype of the statistics S and inverses P (None: the weight's).
        inverse_dtype: Dtype the inversion is computed in (default float32).
        init_grad_scale: As for :class:`~singd.SINGD`.
        kl_clip: As for :class:`~singd.SINGD`.
        grad_scaler: As for :class:`~singd.SINGD`.
        fallback: As for :class:`~singd.SINGD` (the rule for every trainable
            parameter without Kronecker factors; KFAC also sends embeddings there).
        fallback_betas: As for :class:`~singd.SINGD`.
        fallback_eps: As for :class:`~singd.SINGD`.
        distributed: As for :class:`~singd.SINGD`; in the sharded mode each rank
            keeps S and P of its own layers only.

    """

    _STATE_KEY = "kfac"
    _BOUNDS = KFAC_BOUNDS
    config_cls = KFACConfig
    preconditioner_cls = KFACPreconditioner

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        lr: float = 0.001,
        momentum: float = 0.9,
        damping: float = 0.001,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype = torch.float32,
        init_grad_scale: float = 1.0,
        kl_clip: float | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        fallback: str | None = "adamw",
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        distributed: str | Distributor | None = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "weight_decay": weight_decay,
            "T": T,
            "loss_average": loss_average,
            "lr_cov": lr_cov,
            "kfac_approx": kfac_approx,
            "factor_dtype": factor_dtype,
            "inverse_dtype": inverse_dtype,
            "kl_clip": kl_clip,
            "fallback": fallback,
            "fallback_betas": fallback_betas,
            "fallback_eps": fallback_eps,
        }
        super().__init__(
            model,
            params,
            defaults,
            warn_unsupported=warn_unsupported,
            init_grad_scale=init_grad_scale,
            grad_scaler=grad_scaler,
            distributed=distributed,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        group["factor_dtype"] = parse_dtype(group["factor_dtype"], "factor_dtype")
        group["inverse_dtype"] = parse_dtype(group["inverse_dtype"], "inverse_dtype")
        if group["inverse_dtype"] is None:
            raise ValueError("inverse_dtype must be a dtype, not None.")

    def _plan(self, layer: Layer, config: KFACConfig) -> LayerPlan:
        return dense_plan(config, layer.adapter.factor_dims(), config.factor_dtype)

    def layer_state(self, layer_name: str) -> dict[str, Tensor]:
        """S_K, S_C (statistics, start at I) and P_K, P_C (damped inverses) of a layer."""
        pre = self._preconditioners[layer_name]
        assert isinstance(pre, KFACPreconditioner)
        return pre.layer_state()

    def _unsupported_reason(self, layer: Layer) -> str | None:
        if layer.adapter.input_structure is not None:
            return (
                f"KFAC keeps dense factors; {type(layer.module).__name__} needs a "
                f"{layer.adapter.input_structure} input factor"
            )
        return None

    def _plain_group(self, group: dict[str, Any]) -> dict[str, Any]:
        plain = super()._plain_group(group)
        plain["factor_dtype"] = dtype_name(group["factor_dtype"])
        plain["inverse_dtype"] = dtype_name(group["inverse_dtype"])
        return plain
