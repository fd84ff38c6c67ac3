r"""KFAC's per-layer preconditioner: statistics S_K, S_C, inverses P_K, P_C, accumulators U, G.

:math:`S \leftarrow (1-\beta_1) S + \beta_1 U` (start :math:`S = I`) and
:math:`P = (S + \lambda I)^{-1}` in ``inverse_dtype`` at every refresh; the
preconditioning is :math:`P_C \nabla W P_K` (:func:`singd.functional.kfac_natural_gradient`).

Layers of equal sizes and options (repeated blocks) are refreshed and preconditioned as
one stack (:class:`KFACStack`: :func:`refreshed_state` and the preconditioning run once
over ``[L, d, d]`` stacks under :func:`torch.vmap`, :mod:`singd.preconditioners.joint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from singd.config import dtype_name
from singd.functional import kfac_natural_gradient
from singd.functional.kfac import damped_inverse, ema_update
from singd.functional.scalars import Scalar
from singd.layers import grad_output_matrix, input_matrix
from singd.preconditioners.base import LayerPreconditioner, Refreshed
from singd.preconditioners.joint import (
    JointStateBatch,
    cached_batch,
    layout_key,
    split_directions,
    stackable,
    stacked_gradients,
)

if TYPE_CHECKING:
    from singd.config import KFACConfig, LayerPlan
    from singd.layers import Layer

STATE_NAMES = ("S_K", "S_C", "P_K", "P_C")


def refreshed_state(
    state: Mapping[str, Tensor],
    U: Tensor,
    G: Tensor,
    *,
    lr_cov: Scalar,
    h_c_unscale: Scalar,
    damping: float,
    inverse_dtype: torch.dtype,
) -> dict[str, Tensor]:
    """The new S_K, S_C, P_K, P_C of a layer from its statistics U and G (G still carrying
    the gradient scale, removed by ``h_c_unscale``); pure (the inputs are not changed)."""
    S_K = ema_update(state["S_K"], U, lr_cov)
    S_C = ema_update(state["S_C"], G * h_c_unscale, lr_cov)
    return {
        "S_K": S_K,
        "S_C": S_C,
        "P_K": damped_inverse(S_K, damping, inverse_dtype),
        "P_C": damped_inverse(S_C, damping, inverse_dtype),
    }


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
        #: the stacks this preconditioner leads (it is their first layer), by layer names
        self.batches: dict[tuple[str, ...], Any] = {}

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
        self.add_statistics(*self.layer_statistics(x, g, previous_scale))

    def layer_statistics(
        self, x: Tensor, g: Tensor, previous_scale: float
    ) -> tuple[Tensor, Tensor]:
        r"""One pass's :math:`U = A^\top A`, :math:`G = G_m^\top G_m / s_{t-1}` (pure: batched
        over equal layers by :func:`torch.vmap` in :meth:`accumulate_batch`)."""
        dtype = self.dtype_K  # (no state needed: sharded non-owners accumulate too)
        plan, layer = self.plan, self.layer
        A = input_matrix(layer.adapter, x.to(dtype), plan.approx)
        Gm = grad_output_matrix(layer.adapter, g.to(dtype), plan.approx, plan.loss_average_name)
        if previous_scale != 1.0:
            Gm = Gm / math.sqrt(previous_scale)
        return A.T @ A, Gm.T @ Gm

    def add_statistics(self, U: Tensor, G: Tensor) -> None:
        """Add one pass's :math:`U`, :math:`G` to the accumulators."""
        if self.U is None or self.G is None:
            self.U, self.G = U, G
        else:
            self.U.add_(U)
            self.G.add_(G)

    @classmethod
    def accumulate_batch(
        cls,
        pres: Sequence[LayerPreconditioner],
        xs: Sequence[Tensor],
        gs: Sequence[Tensor],
        previous_scale: float,
    ) -> None:
        """Equal layers' passes: inputs and output gradients stacked, :meth:`layer_statistics`
        once under :func:`torch.vmap`; each layer accumulates its rows."""
        kfac = [pre for pre in pres if isinstance(pre, KFACPreconditioner)]
        if len(pres) == 1 or len(kfac) != len(pres):
            return super().accumulate_batch(pres, xs, gs, previous_scale)
        first = kfac[0]
        U, G = torch.vmap(lambda x, g: first.layer_statistics(x, g, previous_scale))(
            torch.stack(list(xs)), torch.stack(list(gs))
        )
        for pre, U_i, G_i in zip(kfac, U.unbind(0), G.unbind(0), strict=True):
            pre.add_statistics(U_i, G_i)
        return None

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
        old = self.layer_state()
        config = self.config
        U, G = self.U, self.G
        self.U = self.G = None
        self.state = refreshed_state(
            old,
            U,
            G,
            lr_cov=lr_cov,
            h_c_unscale=h_c_unscale,
            damping=config.damping,
            inverse_dtype=config.inverse_dtype,
        )

        def undo() -> None:
            self.state = old

        return undo

    def precondition(self, G: Tensor) -> Tensor:
        state = self.layer_state()
        return kfac_natural_gradient(state["P_K"], state["P_C"], G)

    # --- batches (singd.preconditioners.joint) -------------------------------------------
    def batch_key(self) -> tuple[Hashable, ...] | None:
        """Layers of equal adapter class, parameter shapes, dtypes and options form one
        stack (:func:`~singd.preconditioners.joint.stackable`)."""
        config = self.config
        if not stackable(self, config.kl_clip):
            return None
        return (*layout_key(self), self.dtype_K, config.damping, config.inverse_dtype)

    @classmethod
    def refresh_batch(
        cls, batch: Sequence[LayerPreconditioner], lr_cov: Scalar, h_c_unscale: Scalar
    ) -> Refreshed:
        pres = [pre for pre in batch if isinstance(pre, KFACPreconditioner)]
        if len(batch) == 1 or len(pres) != len(batch):
            return super().refresh_batch(batch, lr_cov, h_c_unscale)
        stack = cached_batch(pres, KFACStack, pres[0].batches)
        return stack.refresh(lr_cov, h_c_unscale)

    @classmethod
    def precondition_batch(
        cls, batch: Sequence[LayerPreconditioner], grad_divisor: Scalar
    ) -> list[list[Tensor]]:
        pres = [pre for pre in batch if isinstance(pre, KFACPreconditioner)]
        assert len(pres) == len(batch)
        return cached_batch(pres, KFACStack, pres[0].batches).precondition(grad_divisor)

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


class KFACStack(JointStateBatch[KFACPreconditioner]):
    """KFAC layers of equal ``batch_key``: S_K, S_C, P_K, P_C as ``[L, d, d]`` stacks whose
    rows the layers hold (module docstring)."""

    def __init__(self, pres: Sequence[KFACPreconditioner]) -> None:
        super().__init__(pres)
        self.stack: dict[str, Tensor] | None = None

    def layer_tensors(self, pre: KFACPreconditioner) -> list[Tensor | None] | None:
        return None if pre.state is None else [pre.state.get(k) for k in STATE_NAMES]

    def current(self) -> dict[str, Tensor]:
        """The stacked committed state (stacked afresh if a layer's tensors changed)."""
        if self.stack is not None and self.synced():
            return self.stack
        states = [pre.layer_state() for pre in self.pres]
        stack = {k: torch.stack([s[k] for s in states]) for k in STATE_NAMES}
        self.install(stack)
        return stack

    def install(self, stack: dict[str, Tensor]) -> None:
        """Give every layer the rows of ``stack`` as its state."""
        rows = {k: t.unbind(0) for k, t in stack.items()}
        self.views = []
        for i, pre in enumerate(self.pres):
            state = {k: rows[k][i] for k in STATE_NAMES}
            pre.state = state
            self.views.append(list(state.values()))
        self.stack = stack

    def forget(self) -> None:
        self.stack = None
        super().forget()

    def refresh(self, lr_cov: Scalar, h_c_unscale: Scalar) -> Refreshed:
        """Refresh every layer from its accumulated U, G (consumed)."""
        pres = self.pres
        old = self.current()
        undo = self.snapshot()
        U = torch.stack([pre.U for pre in pres])  # type: ignore[misc]
        G = torch.stack([pre.G for pre in pres])  # type: ignore[misc]
        for pre in pres:
            pre.drop_statistics()
        config = pres[0].config

        def one(state: dict[str, Tensor], U: Tensor, G: Tensor) -> dict[str, Tensor]:
            return refreshed_state(
                state,
                U,
                G,
                lr_cov=lr_cov,
                h_c_unscale=h_c_unscale,
                damping=config.damping,
                inverse_dtype=config.inverse_dtype,
            )

        new = torch.vmap(one)(old, U, G)
        self.install(new)
        replaced = [([new[k] for k in STATE_NAMES], [old[k] for k in STATE_NAMES])]
        return Refreshed(checks=self.checks(), replaced=replaced, undo=[undo])

    def precondition(self, grad_divisor: Scalar) -> list[list[Tensor]]:
        r""":math:`P_C [\nabla W | \nabla b] P_K` of every layer, split like its parameters."""
        stack = self.current()
        G = stacked_gradients(self.pres, grad_divisor)
        N = torch.vmap(kfac_natural_gradient)(stack["P_K"], stack["P_C"], G)
        return split_directions(N, self.pres)
