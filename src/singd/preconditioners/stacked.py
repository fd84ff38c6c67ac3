r"""SINGD layers of equal structures and sizes, refreshed and preconditioned as one stack.

Transformer blocks, residual stages and MLPs repeat one layer shape many times. For
a list of :class:`~singd.preconditioners.singd.SINGDPreconditioner` with equal
``batch_key`` — the same structures and dimensions of K and C, weight shape, bias,
hyper-parameters, dtypes and device — :class:`StackedBatch` keeps each stored tensor of
K, C, m_K, m_C as one ``[L, …]`` stack whose rows are the layers' tensors (views,
:mod:`singd.preconditioners.joint`), and runs the per-matrix math of
:func:`~singd.functional.update_factors` and
:func:`~singd.functional.natural_gradient` once over the stacks with
:func:`torch.vmap`: every operation of a structure becomes one batched operation
(``mm`` → ``bmm``), so a refresh or a preconditioning costs about as many operations
for L layers as for one (1.1–1.6×, measured in ``tests/test_op_count.py``), on every
structure and without a batched copy of its code. A structure needs nothing for this
but operations that ``vmap`` can batch (:func:`singd.structures._linalg.tracing`
names the three things it cannot do).

The statistics of equal layers are formed together too: a pass's input and output
gradient wait until the end of the backward pass (:mod:`singd.optim.pending`), and
:func:`stacked_statistics` forms the projected :math:`H_K = \hat\Pi(K^\top U K)`,
:math:`H_C` of all of them under one :func:`torch.vmap` of the per-layer
:meth:`~singd.preconditioners.singd.SINGDPreconditioner.layer_statistics`. Each layer
accumulates its rows; a refresh stacks them (one operation per stored tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from singd.functional import (
    FactorHyperparams,
    FactorState,
    natural_gradient,
    update_factors,
)
from singd.functional.scalars import Scalar
from singd.preconditioners.base import Refreshed
from singd.preconditioners.joint import (
    FACTOR_NAMES,
    JointStateBatch,
    split_directions,
    stacked_gradients,
)
from singd.structures import Structure, StructuredMatrix

if TYPE_CHECKING:
    from singd.preconditioners.singd import SINGDPreconditioner

#: A layer's (or the stack's) state: factor name → stored tensor name → tensor.
StateTensors = dict[str, dict[str, Tensor]]


def _matrix(structure: Structure, dim: int, tensors: dict[str, Tensor]) -> StructuredMatrix:
    """A matrix of ``structure`` from tensors known to fit it (the stack's own rows:
    no shape check, which would allocate a template inside the batched code)."""
    return structure.matrix_cls(structure, dim, dict(tensors))


class StackedBatch(JointStateBatch["SINGDPreconditioner"]):
    """The stacked state of one batch of equal SINGD layers (module docstring).

    Args:
        pres: The batch's preconditioners (equal ``batch_key``), in layer order.
    """

    def __init__(self, pres: Sequence[SINGDPreconditioner]) -> None:
        super().__init__(pres)
        plan = self.pres[0].plan
        self.structures = {"K": plan.structure_K, "C": plan.structure_C}
        self.dims = {"K": plan.d_K, "C": plan.d_C}
        self.stack: StateTensors | None = None  # whose rows the layers' states hold

    def _side(self, factor_name: str) -> str:
        return factor_name[-1]  # m_K → K

    def _state(self, tensors: StateTensors) -> FactorState:
        """A :class:`FactorState` over ``tensors`` (one layer's, or batched inside vmap)."""
        factors = {
            name: _matrix(self.structures[self._side(name)], self.dims[self._side(name)], t)
            for name, t in tensors.items()
        }
        return FactorState(
            K=factors["K"], C=factors["C"], m_K=factors.get("m_K"), m_C=factors.get("m_C")
        )

    # --- the stacked state -------------------------------------------------------------
    def layer_tensors(self, pre: SINGDPreconditioner) -> list[Tensor | None] | None:
        return None if pre.state is None else self._tensors_of(pre.state)

    @staticmethod
    def _tensors_of(state: FactorState) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for name in FACTOR_NAMES:
            factor = getattr(state, name)
            out += [None] if factor is None else list(factor.tensors().values())
        return out

    def current(self) -> StateTensors:
        """The stacked committed state (stacked afresh if a layer's tensors changed)."""
        if self.stack is not None and self.synced():
            return self.stack
        states = [pre.factors() for pre in self.pres]
        stack: StateTensors = {}
        for name in FACTOR_NAMES:
            factors = [getattr(s, name) for s in states]
            if any(f is None for f in factors):
                continue
            stack[name] = {
                key: torch.stack([f.tensors()[key] for f in factors])
                for key in factors[0].tensors()
            }
        self.install(stack)
        return stack

    def install(self, stack: StateTensors) -> None:
        """Give every layer the rows of ``stack`` as its K, C, m_K, m_C."""
        rows = {
            name: {key: t.unbind(0) for key, t in tensors.items()}
            for name, tensors in stack.items()
        }
        self.views = []
        for i, pre in enumerate(self.pres):
            layer = {name: {key: r[i] for key, r in keyed.items()} for name, keyed in rows.items()}
            pre.state = self._state(layer)
            self.views.append(self._tensors_of(pre.state))
        self.stack = stack

    def forget(self) -> None:
        self.stack = None
        super().forget()

    # --- refresh and preconditioning ------------------------------------------------
    def refresh(self, lr_cov: Scalar, h_c_unscale: Scalar) -> Refreshed:
        """Refresh every layer from its accumulated :math:`H_K`, :math:`H_C`."""
        pres = self.pres
        old = self.current()
        undo = self.snapshot()
        H = {
            side: {
                key: torch.stack([getattr(pre, f"H_{side}").tensors()[key] for pre in pres])
                for key in getattr(pres[0], f"H_{side}").tensors()
            }
            for side in ("K", "C")
        }
        for pre in pres:
            pre.drop_statistics()
        hp = pres[0].hyperparams(lr_cov)
        new = torch.vmap(self._update(hp, h_c_unscale))(old, H)
        self.install(new)

        def flat(tensors: StateTensors) -> list[Tensor]:
            return [t for name in tensors for t in tensors[name].values()]

        return Refreshed(checks=self.checks(), replaced=[(flat(new), flat(old))], undo=[undo])

    def _update(
        self, hp: FactorHyperparams, h_c_unscale: Scalar
    ) -> Callable[[StateTensors, StateTensors], StateTensors]:
        """One layer's factor update on its tensors (what :func:`torch.vmap` batches)."""

        def update(state: StateTensors, H: StateTensors) -> StateTensors:
            H_K = _matrix(self.structures["K"], self.dims["K"], H["K"])
            H_C = _matrix(self.structures["C"], self.dims["C"], H["C"])
            new = update_factors(self._state(state), H_K, H_C, hp, h_c_unscale)
            out = {"K": new.K.tensors(), "C": new.C.tensors()}
            if new.m_K is not None and new.m_C is not None:
                out.update(m_K=new.m_K.tensors(), m_C=new.m_C.tensors())
            return out

        return update

    def precondition(self, grad_divisor: Scalar) -> list[list[Tensor]]:
        r""":math:`C C^\top [\nabla W | \nabla b] K K^\top` of every layer, split like
        its parameters (weight, bias)."""
        stack = self.current()
        G = stacked_gradients(self.pres, grad_divisor)

        def one(K: dict[str, Tensor], C: dict[str, Tensor], G: Tensor) -> Tensor:
            K_ = _matrix(self.structures["K"], self.dims["K"], K)
            C_ = _matrix(self.structures["C"], self.dims["C"], C)
            return natural_gradient(K_, C_, G)

        return split_directions(torch.vmap(one)(stack["K"], stack["C"], G), self.pres)


def stacked_statistics(
    pres: Sequence[SINGDPreconditioner],
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    previous_scale: float,
) -> list[tuple[StructuredMatrix, StructuredMatrix]]:
    r"""One pass's :math:`H_K, H_C` of equal layers (equal
    :meth:`~singd.preconditioners.singd.SINGDPreconditioner.statistics_key`) at once.

    The inputs and output gradients are stacked, and the per-layer
    :meth:`~singd.preconditioners.singd.SINGDPreconditioner.layer_statistics` runs
    once over the stacks under :func:`torch.vmap`, with the layers' K and C stacked
    (projected statistics) or without them (factor-free): a few operations for any
    number of layers. Returns each layer's matrices, views of the stacked results.
    """
    first = pres[0]
    plan = first.plan
    structures = {"K": plan.structure_K, "C": plan.structure_C}
    dims = {"K": plan.d_K, "C": plan.d_C}
    factors: StateTensors | None = None
    if not first.raw_statistics:
        states = [pre.factors() for pre in pres]
        factors = {
            side: {
                key: torch.stack([getattr(s, side).tensors()[key] for s in states])
                for key in getattr(states[0], side).tensors()
            }
            for side in ("K", "C")
        }
    kinds: dict[str, tuple[Structure, int]] = {}

    def per_layer(
        factors: StateTensors | None, x: Tensor, g: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        K = C = None
        if factors is not None:
            K = _matrix(structures["K"], dims["K"], factors["K"])
            C = _matrix(structures["C"], dims["C"], factors["C"])
        H_K, H_C = first.layer_statistics(K, C, x, g, previous_scale)
        kinds["K"], kinds["C"] = (H_K.structure, H_K.dim), (H_C.structure, H_C.dim)
        return dict(H_K.tensors()), dict(H_C.tensors())

    in_dims = (None if factors is None else 0, 0, 0)
    stacked = torch.vmap(per_layer, in_dims=in_dims)(
        factors, torch.stack(list(xs)), torch.stack(list(gs))
    )
    rows = [{key: t.unbind(0) for key, t in side.items()} for side in stacked]  # (K side, C side)
    out = []
    for i in range(len(pres)):
        H = [
            _matrix(*kinds[side], {key: r[i] for key, r in keyed.items()})
            for side, keyed in zip(("K", "C"), rows, strict=True)
        ]
        out.append((H[0], H[1]))
    return out
