r"""SINGD layers with diagonal K and C, refreshed and preconditioned as one batch.

:class:`DiagonalBatch` drives :class:`singd.functional.batched.DiagonalGroup` for a
list of :class:`~singd.preconditioners.singd.SINGDPreconditioner` of equal
``batch_key`` (same hyper-parameters, dtypes and device). The layers' diagonals of
K, C, m_K, m_C are *views* of four concatenated vectors, so a refresh reads them
without copying, writes four new vectors (the guard commits them with four
``torch.where``, :mod:`singd.optim.guard`), and hands every layer views of the new
ones (:mod:`singd.preconditioners.joint`: checked by identity, concatenated afresh
when a layer's tensors were replaced).

The hooks of batched layers accumulate the factor-free statistics
:math:`\operatorname{diag}(U)`, :math:`\operatorname{diag}(G)`
(:func:`singd.functional.statistics.input_statistic`), and
:math:`k^2 \odot \operatorname{diag}(U)` is formed at the refresh for all layers in
one operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from singd.functional import FactorState
from singd.functional.batched import DiagonalFactors, DiagonalGroup
from singd.functional.scalars import Scalar, is_one
from singd.preconditioners.base import Refreshed
from singd.preconditioners.joint import FACTOR_NAMES, JointStateBatch
from singd.structures import Diagonal, DiagonalMatrix

if TYPE_CHECKING:
    from singd.preconditioners.singd import SINGDPreconditioner

_DIAGONAL = Diagonal()


def _diagonal(view: Tensor) -> DiagonalMatrix:
    return DiagonalMatrix(_DIAGONAL, view.shape[0], {"diag": view})


def _diag_of(factor: object) -> Tensor | None:
    return factor.diag if isinstance(factor, DiagonalMatrix) else None


class DiagonalBatch(JointStateBatch["SINGDPreconditioner"]):
    """The concatenated state of one batch of diagonal SINGD layers (module docstring).

    Args:
        pres: The batch's preconditioners, in the optimizer's layer order.
    """

    def __init__(self, pres: Sequence[SINGDPreconditioner]) -> None:
        super().__init__(pres)
        states = [pre.factors() for pre in self.pres]
        self.group = DiagonalGroup(
            [(s.K.dim, s.C.dim) for s in states],
            [pre.layer.weight.shape for pre in self.pres],
            [len(pre.layer.params) == 2 for pre in self.pres],
            states[0].K.dtype,
            states[0].C.dtype,
            states[0].K.device,
        )
        self.flat: DiagonalFactors | None = None  # whose views the layers' states hold
        self.squares_of: DiagonalFactors | None = None  # whose k², c² group.k2/c2 hold

    # --- the concatenated state -----------------------------------------------------
    def layer_tensors(self, pre: SINGDPreconditioner) -> list[Tensor | None] | None:
        if pre.state is None:
            return None
        return [_diag_of(getattr(pre.state, name)) for name in FACTOR_NAMES]

    def current(self) -> DiagonalFactors:
        """The concatenated committed state (concatenated afresh if a layer's changed)."""
        if self.flat is not None and self.synced():
            return self.flat
        states = [pre.factors() for pre in self.pres]

        def cat(name: str) -> Tensor | None:
            parts = [_diag_of(getattr(s, name)) for s in states]
            if any(p is None for p in parts):
                return None
            return torch.cat(parts)  # type: ignore[arg-type]

        k, c = cat("K"), cat("C")
        assert k is not None and c is not None
        flat = DiagonalFactors(k, c, cat("m_K"), cat("m_C"))
        self.install(flat)
        return flat

    def install(self, flat: DiagonalFactors) -> None:
        """Give every layer views of ``flat`` as its K, C, m_K, m_C."""
        K_seg, C_seg = self.group.K_segments, self.group.C_segments
        ks, cs = K_seg.split(flat.k), C_seg.split(flat.c)
        mks = K_seg.split(flat.m_k) if flat.m_k is not None else [None] * len(self.pres)
        mcs = C_seg.split(flat.m_c) if flat.m_c is not None else [None] * len(self.pres)
        self.views = []
        for pre, k, c, mk, mc in zip(self.pres, ks, cs, mks, mcs, strict=True):
            pre.state = FactorState(
                K=_diagonal(k),
                C=_diagonal(c),
                m_K=_diagonal(mk) if mk is not None else None,
                m_C=_diagonal(mc) if mc is not None else None,
            )
            self.views.append([k, c, mk, mc])
        self.flat = flat

    def forget(self) -> None:
        self.flat = self.squares_of = None
        super().forget()

    def _fill_squares(self, flat: DiagonalFactors) -> None:
        self.group.set_squares(flat.k, flat.c)
        self.squares_of = flat

    # --- refresh and preconditioning ------------------------------------------------
    def refresh(self, lr_cov: Scalar, h_c_unscale: Scalar) -> Refreshed:
        """Refresh every layer from its raw statistics (``pre.raw_statistics``)."""
        pres = self.pres
        old = self.current()
        undo = self.snapshot()
        h_k = torch.cat([pre.H_K.tensors()["diag"] for pre in pres])  # type: ignore[union-attr]
        h_c = torch.cat([pre.H_C.tensors()["diag"] for pre in pres])  # type: ignore[union-attr]
        for pre in pres:
            pre.drop_statistics()
        hp = pres[0].hyperparams(lr_cov)
        new = self.group.refresh(old, h_k, h_c, hp, h_c_unscale, raw=True)
        self.install(new)
        self._fill_squares(new)
        return Refreshed(
            checks=self.checks(),
            replaced=[(new.tensors(), old.tensors())],
            undo=[undo],
            # the new vectors now hold the committed values (the old ones if skipped)
            after_commit=[lambda: self._fill_squares(new)],
        )

    def precondition(self, grad_divisor: Scalar) -> list[list[Tensor]]:
        r""":math:`(c^2 \otimes k^2) \odot \nabla W` of every layer (weight, bias)."""
        flat = self.current()
        if self.squares_of is not flat:
            self._fill_squares(flat)
        weights = [pre.layer.params[0].grad for pre in self.pres]
        biases = [pre.layer.params[1].grad for pre in self.pres if len(pre.layer.params) == 2]
        grads: list[Tensor] = [g for g in weights + biases if g is not None]
        if not is_one(grad_divisor):
            grads = list(torch._foreach_div(grads, grad_divisor))
        scaled = self.group.precondition(grads)
        biased = iter(scaled[len(self.pres) :])
        return [
            [weight] + ([next(biased)] if len(pre.layer.params) == 2 else [])
            for pre, weight in zip(self.pres, scaled[: len(self.pres)], strict=True)
        ]
