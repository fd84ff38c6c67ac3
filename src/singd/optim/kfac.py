r"""KFAC baseline with the same layers, hooks and statistics as SINGD (spec §1.2).

Exists so users and benchmarks can compare SINGD with KFAC in one API, and so
Theorem 1 (IKFAC ≈ KFAC to first order in β₁) can be tested. Statistics start at
:math:`S = I`; the EMA weight is β₁ = ``lr_cov``; inverses
:math:`(S+\lambda I)^{-1}` are computed every ``T`` steps in ``inverse_dtype``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from singd.config import KFACConfig, LayerPlan, dense_plan, dtype_name
from singd.optim.base import KroneckerOptimizer, Layer
from singd.optim.options import KroneckerOptions, shared_options, split_options
from singd.optim.validation import KFAC_BOUNDS, parse_dtype
from singd.preconditioners import KFACPreconditioner

if TYPE_CHECKING:
    from typing_extensions import Unpack


@shared_options(
    docs={
        "damping": "λ, added to both factors before inversion.",
        "T": "Update statistics and inverses every ``T`` steps.",
        "lr_cov": "β₁, the EMA weight of the statistics (float or callable of the step).",
        "fallback": "As for :class:`~singd.SINGD` (the rule for every trainable parameter "
        "without Kronecker factors; KFAC also sends embeddings there).",
        "distributed": "As for :class:`~singd.SINGD`; in the sharded mode each rank keeps "
        "S and P of its own layers only.",
    }
)
class KFAC(KroneckerOptimizer):
    """Kronecker-factored approximate curvature with explicit damped inverses.

    Args:
        model: The model, or its ``DistributedDataParallel`` wrapper.
        params: As for :class:`~singd.SINGD`.
        <shared options>
        factor_dtype: Dtype of the statistics S and inverses P (None: the weight's).
        inverse_dtype: Dtype the inversion is computed in (default float32).
        <constructor options>
    """

    _STATE_KEY = "kfac"
    _BOUNDS = KFAC_BOUNDS
    config_cls = KFACConfig
    preconditioner_cls = KFACPreconditioner

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        *,
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype = torch.float32,
        **options: Unpack[KroneckerOptions],
    ) -> None:
        defaults, constructor = split_options(KFAC, options)
        defaults.update(factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
        super().__init__(model, params, defaults, **constructor)

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
