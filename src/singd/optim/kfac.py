r"""KFAC baseline with the same layers, hooks and statistics as SINGD (spec §1.2).

Exists so users and benchmarks can compare SINGD with KFAC in one API, and so
Theorem 1 (IKFAC ≈ KFAC to first order in β₁) can be tested. Statistics start at
:math:`S = I`; the EMA weight is β₁ = ``lr_cov``; inverses
:math:`(S+\lambda I)^{-1}` are computed every ``T`` steps in ``inverse_dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from singd.distributed import Distributor
from singd.functional import kfac_natural_gradient
from singd.functional.kfac import damped_inverse, ema_update
from singd.layers import grad_output_matrix, input_matrix
from singd.optim.base import KroneckerOptimizer, Layer
from singd.optim.validation import (
    KFAC_BOUNDS,
    dtype_name,
    parse_dtype,
    resolve_lr_cov,
)

_STATE_NAMES = ("S_K", "S_C", "P_K", "P_C")


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
        self._kfac_state: dict[str, dict[str, Tensor]] = {}
        self._U: dict[str, Tensor] = {}
        self._G: dict[str, Tensor] = {}
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

    def layer_state(self, layer_name: str) -> dict[str, Tensor]:
        """S_K, S_C (statistics, start at I) and P_K, P_C (damped inverses) of a layer."""
        state = self._kfac_state.get(layer_name)
        if state is None:
            layer = self._layers[layer_name]
            group = self.group_of(layer_name)
            dtype = group["factor_dtype"] or layer.weight.dtype
            d_K, d_C = layer.adapter.factor_dims(layer.module)
            kw = {"dtype": dtype, "device": layer.weight.device}
            state = {"S_K": torch.eye(d_K, **kw), "S_C": torch.eye(d_C, **kw)}
            state["P_K"] = damped_inverse(state["S_K"], group["damping"], group["inverse_dtype"])
            state["P_C"] = damped_inverse(state["S_C"], group["damping"], group["inverse_dtype"])
            self._kfac_state[layer_name] = state
        return state

    def _accumulate(self, layer: Layer, group: dict[str, Any], x: Tensor, g: Tensor) -> None:
        dtype = group["factor_dtype"] or layer.weight.dtype  # (no state: sharded non-owners)
        approx = group["kfac_approx"]
        A = input_matrix(layer.adapter, layer.module, x.to(dtype), approx)
        Gm = grad_output_matrix(
            layer.adapter, layer.module, g.to(dtype), approx, group["loss_average"]
        )
        previous_scale = self._scales.previous(self.steps)
        if previous_scale != 1.0:
            Gm = Gm / math.sqrt(previous_scale)
        for store, stat in ((self._U, A.T @ A), (self._G, Gm.T @ Gm)):
            if layer.name in store:
                store[layer.name].add_(stat)
            else:
                store[layer.name] = stat

    def _has_statistics(self, layer: Layer) -> bool:
        return layer.name in self._U

    def _unsupported_reason(self, layer: Layer) -> str | None:
        if layer.adapter.input_structure is not None:
            return (
                f"KFAC keeps dense factors; {type(layer.module).__name__} needs a "
                f"{layer.adapter.input_structure} input factor"
            )
        return None

    def _forget_layer(self, layer: Layer) -> None:
        for store in (self._kfac_state, self._U, self._G):
            store.pop(layer.name, None)

    def _describe_layer(self, layer: Layer) -> tuple[str, int]:
        d_K, d_C = layer.adapter.factor_dims(layer.module)
        group = self.group_of(layer.name)
        dtype = group["factor_dtype"] or layer.weight.dtype
        text = f"S_K, P_K: dense {d_K}, S_C, P_C: dense {d_C} {dtype_name(dtype)}"
        return text, 2 * (d_K**2 + d_C**2) * dtype.itemsize

    def _clear_statistics(self) -> None:
        self._U.clear()
        self._G.clear()

    def _statistics(self, layer: Layer) -> tuple[list[Tensor], list[Tensor]]:
        return [self._U[layer.name]], [self._G[layer.name]]

    def _drop_statistics(self, layer: Layer) -> None:
        self._U.pop(layer.name, None)
        self._G.pop(layer.name, None)

    def _refresh(
        self, layer: Layer, group: dict[str, Any], h_c_unscale: float
    ) -> tuple[Tensor, Callable[[], None]]:
        old = dict(self.layer_state(layer.name))
        state = self.layer_state(layer.name)
        beta1 = resolve_lr_cov(group["lr_cov"], self.steps, table=KFAC_BOUNDS)
        U, G = self._U.pop(layer.name), self._G.pop(layer.name) * h_c_unscale
        state["S_K"] = ema_update(state["S_K"], U, beta1)
        state["S_C"] = ema_update(state["S_C"], G, beta1)
        state["P_K"] = damped_inverse(state["S_K"], group["damping"], group["inverse_dtype"])
        state["P_C"] = damped_inverse(state["S_C"], group["damping"], group["inverse_dtype"])
        finite = torch.stack([torch.isfinite(t).all() for t in state.values()]).all()

        def undo() -> None:
            self._kfac_state[layer.name] = old

        return finite, undo

    def _precondition(self, layer: Layer, G: Tensor) -> Tensor:
        state = self.layer_state(layer.name)
        return kfac_natural_gradient(state["P_K"], state["P_C"], G)

    def _plain_group(self, group: dict[str, Any]) -> dict[str, Any]:
        plain = super()._plain_group(group)
        plain["factor_dtype"] = dtype_name(group["factor_dtype"])
        plain["inverse_dtype"] = dtype_name(group["inverse_dtype"])
        return plain

    def _layer_state(self, layer: Layer) -> dict[str, Tensor]:
        return dict(self._kfac_state.get(layer.name, {}))

    def _load_layer_state(self, layer: Layer, state: Mapping[str, Tensor]) -> None:
        self._kfac_state.pop(layer.name, None)
        if state:
            like = self.layer_state(layer.name)
            self._kfac_state[layer.name] = {
                k: state[k].to(device=like[k].device, dtype=like[k].dtype).clone()
                for k in _STATE_NAMES
            }
