r"""The factor refresh and the preconditioning over *lists* of layers (multi-tensor form).

On accelerators a step is bound by the number of operations it dispatches (about
25 µs of host time each, see :mod:`singd.structures._linalg`), not by arithmetic, so
the per-layer loop of :func:`~singd.functional.factors.update_factors` and
:func:`~singd.functional.precondition.natural_gradient` costs a fixed price per
layer. The functions here do the same arithmetic for a whole list of layers with a
number of operations that does not grow with the number of layers — the pattern of
``torch.optim``'s ``_multi_tensor_adam``.

**Diagonal factors** (:class:`DiagonalGroup`): the diagonals of K (and of C, m_K,
m_C) of a list of layers, whatever their sizes, are one concatenated vector; the
per-layer reductions (average traces, :math:`\|m\|_\infty`) are segment reductions
(``torch.segment_reduce``) over it. :meth:`DiagonalGroup.refresh` is then about fifty
operations for any number of layers, and *pure*: it returns new vectors and changes
none of its inputs, so a caller can commit or discard the result
(:mod:`singd.optim.guard`). The preconditioning :math:`C C^\top G K K^\top = (c^2
\otimes k^2) \odot G` is two ``torch._foreach_mul`` over all gradients, with
:math:`c^2` and :math:`k^2` kept in one buffer per side whose per-layer views are
shaped like the gradients (:meth:`DiagonalGroup.set_squares`).

The arithmetic is the one of :mod:`singd.functional.factors` (same formulas, same
order of the rounding steps except for the sums inside the average traces, which
are segment sums); ``tests/test_batched.py`` checks both forms against each other and
against the float64 oracle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from singd.functional.factors import FactorHyperparams
from singd.functional.scalars import Scalar


@dataclasses.dataclass
class Segments:
    """Concatenated vectors of ``sizes``: the segment lengths and entry → segment index."""

    sizes: list[int]
    lengths: Tensor  # [L] int64
    index: Tensor  # [N] int64
    inverse_sizes: Tensor  # [L, 1] in the accumulation dtype: 1/d

    @classmethod
    def build(cls, sizes: list[int], dtype: torch.dtype, device: torch.device) -> Segments:
        lengths = torch.tensor(sizes, dtype=torch.int64)
        index = torch.repeat_interleave(torch.arange(len(sizes)), lengths)
        inverse = torch.tensor([[1.0 / d] for d in sizes], dtype=torch.float64)
        return cls(
            sizes,
            lengths.to(device),
            index.to(device),
            inverse.to(device=device, dtype=accumulation_dtype(dtype)),
        )

    def sums(self, data: Tensor) -> Tensor:
        """Per-segment sums of ``data`` ``[N, …]`` → ``[L, …]`` (deterministic; no sync)."""
        # unsafe: skip the check that the lengths add up to N, which reads them on the host
        return torch.segment_reduce(data, "sum", lengths=self.lengths, unsafe=True)

    def maxima(self, data: Tensor) -> Tensor:
        """Per-segment maxima of ``data`` ``[N]`` → ``[L]``."""
        return torch.segment_reduce(data, "max", lengths=self.lengths, unsafe=True)

    def spread(self, per_segment: Tensor) -> Tensor:
        """Per-segment values ``[L, …]`` → one per entry ``[N, …]``."""
        return per_segment.index_select(0, self.index)

    def split(self, data: Tensor) -> list[Tensor]:
        """``[N]`` → one view per segment (one operation)."""
        return list(data.split(self.sizes))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of a half-precision vector are formed (they overflow or lose digits)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclasses.dataclass
class DiagonalFactors:
    """The concatenated diagonals of the layers of a :class:`DiagonalGroup`:
    :math:`k`, :math:`c`, and the momenta :math:`m_K`, :math:`m_C` (None if α₁ = 0)."""

    k: Tensor
    c: Tensor
    m_k: Tensor | None = None
    m_c: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        """The vectors that are present, in the order k, c, m_k, m_c."""
        return [t for t in (self.k, self.c, self.m_k, self.m_c) if t is not None]


class DiagonalGroup:
    r"""Layers whose K and C are both diagonal: refreshed and applied all at once.

    Holds, per factor side, the segment layout of the concatenated diagonals and a
    buffer with :math:`k^2` (resp. :math:`c^2`) of every layer, whose per-layer views
    shaped like the gradients make the preconditioning two ``_foreach_mul`` calls.

    Args:
        dims: ``(d_K, d_C)`` per layer.
        weight_shapes: The weight shape of each layer (its gradient's); its first
            dimension is ``d_C`` and the others multiply to ``d_K`` (without bias).
        has_bias: Whether each layer's K has a bias entry (its last one).
        dtype_K, dtype_C: Dtypes of K and C.
        device: Their device.
    """

    def __init__(
        self,
        dims: Sequence[tuple[int, int]],
        weight_shapes: Sequence[torch.Size],
        has_bias: Sequence[bool],
        dtype_K: torch.dtype,
        dtype_C: torch.dtype,
        device: torch.device,
    ) -> None:
        self.dims = list(dims)
        self.dtype_K, self.dtype_C = dtype_K, dtype_C
        self.K_segments = Segments.build([d for d, _ in dims], dtype_K, device)
        self.C_segments = Segments.build([d for _, d in dims], dtype_C, device)
        self.k2 = torch.ones(sum(d for d, _ in dims), dtype=dtype_K, device=device)
        self.c2 = torch.ones(sum(d for _, d in dims), dtype=dtype_C, device=device)
        # views of the buffers shaped to broadcast against [weight, bias] gradients
        k2_parts = self.k2.split(self.K_segments.sizes)
        c2_parts = self.c2.split(self.C_segments.sizes)
        weight_rows, weight_columns, bias_rows, bias_columns = [], [], [], []
        for k2, c2, shape, bias in zip(k2_parts, c2_parts, weight_shapes, has_bias, strict=True):
            d_in = k2.shape[0] - int(bias)
            weight_rows.append(c2.view(shape[0], *([1] * (len(shape) - 1))))
            weight_columns.append(k2[:d_in].view(1, *shape[1:]))
            if bias:
                bias_rows.append(c2)
                bias_columns.append(k2[d_in])
        self.rows: list[Tensor] = weight_rows + bias_rows  # c² as [d_C, 1, …] and [d_C]
        self.columns: list[Tensor] = weight_columns + bias_columns  # k² as [1, …] and []
        self._constants: dict[tuple[tuple[float, float], torch.dtype], Tensor] = {}

    def set_squares(self, k: Tensor, c: Tensor) -> None:
        """Fill the :math:`k^2`, :math:`c^2` buffers from concatenated diagonals."""
        torch.mul(k, k, out=self.k2)
        torch.mul(c, c, out=self.c2)

    def refresh(
        self,
        old: DiagonalFactors,
        h_k: Tensor,
        h_c: Tensor,
        hp: FactorHyperparams,
        h_c_unscale: Scalar = 1.0,
        *,
        raw: bool = False,
    ) -> DiagonalFactors:
        r"""One factor update of every layer; returns the new diagonals (nothing written).

        ``h_k``, ``h_c`` are the concatenated diagonals of :math:`\hat\Pi(K^\top U K)`,
        :math:`\hat\Pi(C^\top G C)`, or with ``raw`` those of U and G (then
        :math:`k^2 \odot \operatorname{diag}(U)` is formed here, for all layers in one
        operation). The arithmetic of :func:`~singd.functional.factors.update_factors`.
        """
        momentum = hp.alpha1 != 0.0
        traces_k, both_k = self._side(old.k, h_k, self.K_segments, raw)
        traces_c, both_c = self._side(old.c, h_c, self.C_segments, raw)
        # traces: [L, 2] columns (average trace of H, average trace of MᵀM)
        if hp.kfac_like:
            # m_K ∝ H_K + λ·KᵀK; m_C ∝ u·H_C + λ·CᵀC
            mixed_k = (both_k * self._constant((1.0, hp.damping), both_k)).sum(1)
            mixed_c = (both_c * self._constant((h_c_unscale, hp.damping), both_c)).sum(1)
        else:
            # m_K ∝ u·tr(H_C)·H_K + λ·tr(CᵀC)·KᵀK; m_C ∝ u·tr(H_K)·H_C + λ·tr(KᵀK)·CᵀC
            weights = self._constant((h_c_unscale, hp.damping), traces_k)
            coef_k = (traces_c * weights.to(traces_c.dtype)).to(both_k.dtype)  # [L, 2]
            coef_c = (traces_k * weights).to(both_c.dtype)
            mixed_k = (both_k * self.K_segments.spread(coef_k)).sum(1)
            mixed_c = (both_c * self.C_segments.spread(coef_c)).sum(1)
        scale = 0.5 * (1.0 - hp.alpha1) if hp.normalize_lr_cov else 0.5
        new_m_k = mixed_k.sub_(1.0).mul_(scale)
        new_m_c = mixed_c.sub_(1.0).mul_(scale)
        if momentum and old.m_k is not None and old.m_c is not None:
            new_m_k.add_(old.m_k, alpha=hp.alpha1)
            new_m_c.add_(old.m_c, alpha=hp.alpha1)
        return DiagonalFactors(
            k=self._step(old.k, new_m_k, self.K_segments, hp),
            c=self._step(old.c, new_m_c, self.C_segments, hp),
            m_k=new_m_k if momentum else None,
            m_c=new_m_c if momentum else None,
        )

    def _constant(self, values: tuple[Scalar, float], like: Tensor) -> Tensor:
        """``values`` as a tensor like ``like``, made once (creating one each refresh
        would be a host-to-device copy); a first value that is a device scalar (the
        compiled step's :math:`u`) is joined to the cached rest."""
        first = values[0]
        if isinstance(first, Tensor):
            rest = self._constant((1.0, values[1]), like)[1:]
            return torch.cat([first.to(like.dtype).reshape(1), rest])
        key = ((first, values[1]), like.dtype)
        cached = self._constants.get(key)
        if cached is None:
            cached = torch.tensor(values, dtype=like.dtype, device=like.device)
            self._constants[key] = cached
        return cached

    @staticmethod
    def _side(diag: Tensor, H: Tensor, segments: Segments, raw: bool) -> tuple[Tensor, Tensor]:
        """(average traces [L, 2], [H | diagonal²] as [N, 2])."""
        H = H.to(diag.dtype)
        squares = diag * diag
        if raw:  # Π(KᵀUK) = k² ⊙ diag(U) (DiagonalMatrix.from_inner_diagonal)
            H = squares * H
        both = torch.stack([H, squares], 1)  # [N, 2]
        traces = segments.sums(both.to(accumulation_dtype(diag.dtype))).mul_(segments.inverse_sizes)
        return traces, both

    @staticmethod
    def _step(factor: Tensor, m: Tensor, segments: Segments, hp: FactorHyperparams) -> Tensor:
        """:math:`K - \\beta_1 K m` (same rounding as the per-matrix form)."""
        if hp.normalize_lr_cov:
            norms = segments.maxima(m.abs()).clamp_min_(1.0)
            beta = segments.spread(norms.reciprocal_().mul_(-hp.lr_cov))
            return (factor * m).mul_(beta).add_(factor)
        return (factor * m).mul_(-hp.lr_cov).add_(factor)

    def precondition(self, grads: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`(c^2 \otimes k^2) \odot G` for the gradients ``[weights…, biases…]``
        (weights of every layer first, then the biases of the layers with a bias; the
        order of the constructor's layers), in two operations, into new tensors."""
        scaled = torch._foreach_mul(list(grads), self.rows)
        torch._foreach_mul_(scaled, self.columns)
        return list(scaled)
