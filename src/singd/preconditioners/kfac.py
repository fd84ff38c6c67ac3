r"""KFAC's per-layer preconditioner: statistics S_K, S_C, inverses P_K, P_C, accumulators U, G.

:math:`S \leftarrow (1-\beta_1) S + \beta_1 U` (start :math:`S = I`) and
:math:`P = (S + \lambda I)^{-1}` in ``inverse_dtype`` at every refresh; the
preconditioning is :math:`P_C \nabla W P_K` (:func:`singd.functional.kfac_natural_gradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from singd.config import dtype_name
from singd.functional import kfac_natural_gradient
from singd.functional.kfac import damped_inverse, ema_update
from singd.functional.scalars import Scalar
from singd.layers import grad_output_matrix, input_matrix
from singd.preconditioners.base import LayerPreconditioner

if TYPE_CHECKING:
    from singd.config import KFACConfig, LayerPlan
    from singd.layers import Layer

STATE_NAMES = ("S_K", "S_C", "P_K", "P_C")


class KFACPreconditioner(LayerPreconditioner):
    """S and P (allocated as S = I on first use) and the U, G accumulators of a layer."""

    ACCUMULATORS = ("U", "G")

    config: KFACConfig

    def __init__(
        self,
        layer: Layer,
        plan: LayerPlan,
        config: KFACConfig,
        *,
        factor_free_statistics: bool = False,
    ) -> None:
        super().__init__(layer, plan, config, factor_free_statistics=factor_free_statistics)
        self.state: dict[str, Tensor] | None = None
        self.U: Tensor | None = None
        self.G: Tensor | None = None

    def layer_state(self) -> dict[str, Tensor]:
        """S_K, S_C (statistics, start at I) and P_K, P_C (damped inverses)."""
        if self.state is None:
            plan, config = self.plan, self.config
            dtype, device = self.dtype_K, self.layer.weight.device
            state = {
                "S_K": torch.eye(plan.d_K, dtype=dtype, device=device),
                "S_C": torch.eye(plan.d_C, dtype=dtype, device=device),
            }
            state["P_K"] = damped_inverse(state["S_K"], config.damping, config.inverse_dtype)
            state["P_C"] = damped_inverse(state["S_C"], config.damping, config.inverse_dtype)
            self.state = state
        return self.state

    # --- statistics ------------------------------------------------------------------
    def accumulate(self, x: Tensor, g: Tensor, previous_scale: float) -> None:
        dtype = self.dtype_K  # (no state needed: sharded non-owners accumulate too)
        plan, layer = self.plan, self.layer
        A = input_matrix(layer.adapter, x.to(dtype), plan.approx)
        Gm = grad_output_matrix(layer.adapter, g.to(dtype), plan.approx, plan.loss_average_name)
        if previous_scale != 1.0:
            Gm = Gm / math.sqrt(previous_scale)
        U, G = A.T @ A, Gm.T @ Gm
        if self.U is None or self.G is None:
            self.U, self.G = U, G
        else:
            self.U.add_(U)
            self.G.add_(G)

    def has_statistics(self) -> bool:
        return self.U is not None

    def statistics(self) -> tuple[list[Tensor], list[Tensor]]:
        assert self.U is not None and self.G is not None
        return [self.U], [self.G]

    def drop_statistics(self) -> None:
        self.U = self.G = None

    # --- state -----------------------------------------------------------------------
    def refresh(self, lr_cov: Scalar, h_c_unscale: Scalar) -> Callable[[], None]:
        assert self.U is not None and self.G is not None
        state = self.layer_state()
        old = dict(state)
        config = self.config
        U, G = self.U, self.G * h_c_unscale
        self.U = self.G = None
        state["S_K"] = ema_update(state["S_K"], U, lr_cov)
        state["S_C"] = ema_update(state["S_C"], G, lr_cov)
        state["P_K"] = damped_inverse(state["S_K"], config.damping, config.inverse_dtype)
        state["P_C"] = damped_inverse(state["S_C"], config.damping, config.inverse_dtype)

        def undo() -> None:
            self.state = old

        return undo

    def precondition(self, G: Tensor) -> Tensor:
        state = self.layer_state()
        return kfac_natural_gradient(state["P_K"], state["P_C"], G)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.state or {})

    def expected_state(self) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
        d_K, d_C = self.plan.d_K, self.plan.d_C
        return {"S_K": (d_K, d_K), "S_C": (d_C, d_C), "P_K": (d_K, d_K), "P_C": (d_C, d_C)}, ()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.state = None
        if state:
            like = self.layer_state()
            self.state = {
                k: state[k].to(device=like[k].device, dtype=like[k].dtype).clone()
                for k in STATE_NAMES
            }

    def describe(self) -> tuple[str, int]:
        plan, dtype = self.plan, self.dtype_K
        text = f"S_K, P_K: dense {plan.d_K}, S_C, P_C: dense {plan.d_C} {dtype_name(dtype)}"
        return text, 2 * (plan.d_K**2 + plan.d_C**2) * dtype.itemsize
