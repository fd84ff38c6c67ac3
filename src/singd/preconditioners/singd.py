r"""SINGD's per-layer preconditioner: factors K, C, momenta m_K, m_C, accumulators H_K, H_C.

At refresh steps the hooks accumulate :math:`H_K = \hat\Pi(K^\top U K)` and
:math:`H_C = \hat\Pi(C^\top G C)` (in the sharded mode the factor-free statistics
of :mod:`singd.functional.statistics`, sandwiched by the owner at the refresh);
the refresh is :func:`singd.functional.update_factors`, the preconditioning
:math:`C C^\top \nabla W K K^\top` (:func:`singd.functional.natural_gradient`).

Layers are refreshed and preconditioned *together* (a number of operations that does
not grow with the number of layers): those whose K and C are both diagonal, whatever
their sizes (:class:`singd.preconditioners.diagonal.DiagonalBatch`; their hooks
accumulate the factor-free diagonals :math:`\operatorname{diag}(U)`,
:math:`\operatorname{diag}(G)`), and those of equal structures and sizes
(:class:`singd.preconditioners.stacked.StackedBatch`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from singd.config import dtype_name
from singd.functional import FactorHyperparams, FactorState, natural_gradient, update_factors
from singd.functional.scalars import Scalar
from singd.functional.statistics import (
    input_curvature,
    input_statistic,
    output_curvature,
    output_statistic,
    sandwich,
)
from singd.layers import LayerAdapter
from singd.preconditioners.base import LayerPreconditioner, Refreshed
from singd.preconditioners.diagonal import DiagonalBatch
from singd.preconditioners.joint import (
    FACTOR_NAMES,
    JointStateBatch,
    cached_batch,
    layout_key,
    stackable,
)
from singd.preconditioners.stacked import StackedBatch, stacked_statistics
from singd.structures import Diagonal, StructuredMatrix, _linalg

if TYPE_CHECKING:
    from singd.config import LayerPlan, SINGDConfig
    from singd.layers import Layer

#: On CPUs, equal layers are stacked only up to this many weights each: there the
#: batched products of a stack and the copies ``torch.vmap`` makes to form them cost
#: more than the per-layer operations they save once a layer is larger (measured on
#: one thread, 6 equal Linear layers d×d: the stacked preconditioning took 19 instead
#: of 4 ms at d = 256 for block_diagonal(30), 47 instead of 17 ms at d = 512 for
#: hierarchical(15, 15); at d ≤ 128 the steps were as fast or faster stacked).
#: Accelerators stack every size (their steps are bound by operation launches).
CPU_STACK_MAX_NUMEL = 128 * 128

#: The first entry of a :meth:`SINGDPreconditioner.batch_key`: which batch runs it.
_BATCH_KINDS: dict[str, type[JointStateBatch]] = {
    "diagonal": DiagonalBatch,
    "stacked": StackedBatch,
}


def restore_factor(like: StructuredMatrix, saved: Mapping[str, Tensor]) -> StructuredMatrix:
    """A factor of ``like``'s structure, dim, dtype and device from saved tensors (copied)."""
    tensors = {k: v.to(device=like.device, dtype=like.dtype).clone() for k, v in saved.items()}
    return like.structure.from_tensors(like.dim, tensors)


class SINGDPreconditioner(LayerPreconditioner):
    """Factors (allocated as K = I, C = I on first use) and the H accumulators of a layer."""

    ACCUMULATORS = ("H_K", "H_C")

    config: SINGDConfig

    def __init__(
        self,
        layer: Layer,
        plan: LayerPlan,
        config: SINGDConfig,
        *,
        factor_free_statistics: bool = False,
    ) -> None:
        super().__init__(layer, plan, config, factor_free_statistics=factor_free_statistics)
        self.state: FactorState | None = None
        self.H_K: StructuredMatrix | None = None
        self.H_C: StructuredMatrix | None = None
        #: H_K, H_C hold the factor-free statistics (sharded; or diag(U), diag(G) of a
        #: batched layer), sandwiched at the refresh
        self.raw_statistics = factor_free_statistics
        #: the batches this preconditioner leads (it is their first layer), by layer names
        self.batches: dict[tuple[str, ...], JointStateBatch] = {}

    def factors(self) -> FactorState:
        """K, C (and m_K, m_C if α₁ ≠ 0), allocated as K = I, C = I on first use."""
        if self.state is None:
            plan, device = self.plan, self.layer.weight.device
            S_K, S_C, dtype_K, dtype_C = (
                plan.structure_K,
                plan.structure_C,
                self.dtype_K,
                self.dtype_C,
            )
            state = FactorState(
                K=S_K.eye(plan.d_K, dtype=dtype_K, device=device),
                C=S_C.eye(plan.d_C, dtype=dtype_C, device=device),
            )
            if self.config.alpha1 != 0:
                state.m_K = S_K.zeros(plan.d_K, dtype=dtype_K, device=device)
                state.m_C = S_C.zeros(plan.d_C, dtype=dtype_C, device=device)
            self.state = state
        return self.state

    # --- statistics ------------------------------------------------------------------
    def accumulate(self, x: Tensor, g: Tensor, previous_scale: float) -> None:
        self._choose_statistics()
        if self.raw_statistics:
            H_K, H_C = self.layer_statistics(None, None, x, g, previous_scale)
        else:
            state = self.factors()
            H_K, H_C = self.layer_statistics(state.K, state.C, x, g, previous_scale)
        self.add_statistics(H_K, H_C)

    def _choose_statistics(self) -> None:
        """The first pass of a step decides the kind of statistics: factor-free (sharded,
        and diagonal batches) or projected with the current K, C."""
        if self.H_K is None:
            key = self.batch_key()
            self.raw_statistics = self.factor_free_statistics or (
                key is not None and key[0] == "diagonal"
            )

    def layer_statistics(
        self,
        K: StructuredMatrix | None,
        C: StructuredMatrix | None,
        x: Tensor,
        g: Tensor,
        previous_scale: float,
    ) -> tuple[StructuredMatrix, StructuredMatrix]:
        r"""One pass's :math:`H_K, H_C`: projected with ``K``, ``C``
        (:func:`~singd.functional.statistics.input_curvature`), or factor-free if they are
        None (:func:`~singd.functional.statistics.input_statistic`). Pure: batched over
        equal layers by :func:`torch.vmap` (:meth:`accumulate_batch`)."""
        plan, adapter = self.plan, self.layer.adapter
        approx, loss_average = plan.approx, plan.loss_average_name
        g = g.to(self.dtype_C)
        # The hook divides by √s_{t−1} (singd.amp): squares carry 1/s_{t−1}.
        if K is not None and C is not None:
            H_K = input_curvature(K, adapter, x, approx)
            H_C = output_curvature(C, adapter, g, approx, loss_average, previous_scale)
            return H_K, H_C
        x = x.to(self.dtype_K) if x.is_floating_point() else x
        H_K = input_statistic(plan.structure_K, adapter, x, approx)
        H_C = output_statistic(plan.structure_C, adapter, g, approx, loss_average, previous_scale)
        return H_K, H_C

    def add_statistics(self, H_K: StructuredMatrix, H_C: StructuredMatrix) -> None:
        """Add one pass's :math:`H_K, H_C` to the accumulators."""
        if self.H_K is None or self.H_C is None:
            self.H_K, self.H_C = H_K, H_C
        else:
            self.H_K.add_(H_K)
            self.H_C.add_(H_C)

    @classmethod
    def accumulate_batch(
        cls,
        pres: Sequence[LayerPreconditioner],
        xs: Sequence[Tensor],
        gs: Sequence[Tensor],
        previous_scale: float,
    ) -> None:
        singd = [pre for pre in pres if isinstance(pre, SINGDPreconditioner)]
        if len(pres) == 1 or len(singd) != len(pres):
            return super().accumulate_batch(pres, xs, gs, previous_scale)
        for pre in singd:
            pre._choose_statistics()
        if len({pre.raw_statistics for pre in singd}) != 1:  # (a layer refreshed alone)
            return super().accumulate_batch(pres, xs, gs, previous_scale)
        for pre, (H_K, H_C) in zip(
            singd, stacked_statistics(singd, xs, gs, previous_scale), strict=True
        ):
            pre.add_statistics(H_K, H_C)
        return None

    def has_statistics(self) -> bool:
        return self.H_K is not None

    def statistics(self) -> tuple[list[Tensor], list[Tensor]]:
        assert self.H_K is not None and self.H_C is not None
        return list(self.H_K.tensors().values()), list(self.H_C.tensors().values())

    def drop_statistics(self) -> None:
        self.H_K = self.H_C = None

    # --- state -----------------------------------------------------------------------
    def hyperparams(self, lr_cov: Scalar) -> FactorHyperparams:
        """The factor update's hyper-parameters with the live β₁."""
        config = self.config
        return FactorHyperparams(
            lr_cov=lr_cov,
            damping=config.damping,
            alpha1=config.alpha1,
            kfac_like=config.kfac_like,
            normalize_lr_cov=config.normalize_lr_cov,
        )

    def refresh(self, lr_cov: Scalar, h_c_unscale: Scalar) -> Callable[[], None]:
        H_K, H_C = self.H_K, self.H_C
        assert H_K is not None and H_C is not None
        self.H_K = self.H_C = None
        old = self.factors()
        if self.raw_statistics:  # (reduced) U, G → H_K, H_C
            H_K, H_C = sandwich(old.K, H_K), sandwich(old.C, H_C)
        new = update_factors(old, H_K, H_C, self.hyperparams(lr_cov), h_c_unscale)
        self.state = new

        def undo() -> None:
            self.state = old

        return undo

    def precondition(self, G: Tensor) -> Tensor:
        state = self.factors()
        return natural_gradient(state.K, state.C, G)

    # --- batches -------------------------------------------------------------------------
    def batch_key(self) -> tuple[Hashable, ...] | None:
        """The batch of a layer with factors on this rank, without KL clipping
        (:func:`~singd.preconditioners.joint.stackable`): layers with diagonal K and C in
        the weight's dtype whose gradient matrix is the weight flattened beside the bias
        (Linear, Conv; any sizes, ``"diagonal"``), else layers of equal structures,
        adapter class, parameter shapes and dtypes (``"stacked"``; on CPUs only layers of at
        most :data:`CPU_STACK_MAX_NUMEL` weights); with equal
        hyper-parameters. None: refreshed and preconditioned alone."""
        plan, config, layer = self.plan, self.config, self.layer
        weight, adapter = layer.weight, type(layer.adapter)
        if not stackable(self, config.kl_clip):
            return None
        state = self.state
        if state is not None and (state.m_K is not None) != (config.alpha1 != 0):
            return None  # (a checkpoint with other momenta: one at a time)
        shared = (config.damping, config.alpha1, config.kfac_like, config.normalize_lr_cov)
        if (
            isinstance(plan.structure_K, Diagonal)
            and isinstance(plan.structure_C, Diagonal)
            and weight.dtype == self.dtype_K == self.dtype_C
            and adapter.grad_matrix is LayerAdapter.grad_matrix
            and adapter.split_matrix is LayerAdapter.split_matrix
            and weight.shape[0] == plan.d_C
        ):
            return ("diagonal", self.dtype_K, weight.device, *shared)
        if _linalg.splits_work(weight) and weight.numel() > CPU_STACK_MAX_NUMEL:
            return None  # (CPUs: larger layers are cheaper one at a time, see there)
        return (
            "stacked",
            str(plan.structure_K),
            str(plan.structure_C),
            self.dtype_K,
            self.dtype_C,
            *layout_key(self),
            *shared,
        )

    @staticmethod
    def _batch(batch: Sequence[LayerPreconditioner]) -> JointStateBatch:
        pres = [pre for pre in batch if isinstance(pre, SINGDPreconditioner)]
        assert len(pres) == len(batch)
        key = pres[0].batch_key()
        assert key is not None
        return cached_batch(pres, _BATCH_KINDS[str(key[0])], pres[0].batches)

    @classmethod
    def refresh_batch(
        cls, batch: Sequence[LayerPreconditioner], lr_cov: Scalar, h_c_unscale: Scalar
    ) -> Refreshed:
        pres = [pre for pre in batch if isinstance(pre, SINGDPreconditioner)]
        if len(batch) == 1 or len(pres) != len(batch):
            return super().refresh_batch(batch, lr_cov, h_c_unscale)
        joint = cls._batch(batch)
        # the statistics the batch expects (a step's first pass decided the kind)
        raw = isinstance(joint, DiagonalBatch)
        if any(pre.raw_statistics is not raw for pre in pres):
            return super().refresh_batch(batch, lr_cov, h_c_unscale)
        return joint.refresh(lr_cov, h_c_unscale)

    @classmethod
    def precondition_batch(
        cls, batch: Sequence[LayerPreconditioner], grad_divisor: Scalar
    ) -> list[list[Tensor]]:
        return cls._batch(batch).precondition(grad_divisor)

    def state_dict(self) -> dict[str, Tensor]:
        if self.state is None:
            return {}
        out: dict[str, Tensor] = {}
        for factor_name in FACTOR_NAMES:
            factor = getattr(self.state, factor_name)
            if factor is not None:
                for tensor_name, t in factor.tensors().items():
                    out[f"{factor_name}.{tensor_name}"] = t
        return out

    def expected_state(self) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
        plan = self.plan
        shapes: dict[str, tuple[int, ...]] = {}
        optional: list[str] = []
        for factor_name, structure, dim in (
            ("K", plan.structure_K, plan.d_K),
            ("C", plan.structure_C, plan.d_C),
            ("m_K", plan.structure_K, plan.d_K),
            ("m_C", plan.structure_C, plan.d_C),
        ):
            template = structure.eye(dim, device="meta")  # (shapes only, nothing allocated)
            names = [f"{factor_name}.{k}" for k in template.tensors()]
            shapes.update(
                {f"{factor_name}.{k}": tuple(t.shape) for k, t in template.tensors().items()}
            )
            if factor_name.startswith("m_") and self.config.alpha1 == 0:
                optional += names  # (momenta saved with α₁ ≠ 0 are loaded, unused)
        return shapes, tuple(optional)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.state = None  # (new tensors: a batch holding views of the old ones re-reads)
        if not state:
            return
        current = self.factors()  # right structures, dims, dtypes and device
        for factor_name in FACTOR_NAMES:
            factor = getattr(current, factor_name)
            prefix = f"{factor_name}."
            saved = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if factor is None:  # a momentum this config does not allocate (α₁ = 0)
                if saved:
                    like = getattr(current, factor_name[-1])
                    setattr(current, factor_name, restore_factor(like, saved))
                continue
            setattr(current, factor_name, restore_factor(factor, saved))

    def describe(self) -> tuple[str, int]:
        state, plan = self.state, self.plan
        if state is None:  # not allocated yet: count what the first step will allocate
            copies = 2 if self.config.alpha1 != 0 else 1
            nbytes = copies * (
                plan.structure_K.num_stored(plan.d_K) * self.dtype_K.itemsize
                + plan.structure_C.num_stored(plan.d_C) * self.dtype_C.itemsize
            )
            return f"K: {plan.structure_K} {plan.d_K}, C: {plan.structure_C} {plan.d_C}", nbytes
        factors = [f for f in (state.K, state.C, state.m_K, state.m_C) if f is not None]
        text = (
            f"K: {state.K.structure} {state.K.dim} {dtype_name(state.K.dtype)}, "
            f"C: {state.C.structure} {state.C.dim} {dtype_name(state.C.dtype)}"
        )
        return text, sum(f.nbytes() for f in factors)
