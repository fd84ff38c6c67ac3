r"""The factor refresh and the preconditioning over *lists* of layers (multi-tensor form).

On accelerators a step is bound by the number of operations it dispatches (about
25 µs of host time each, see :mod:`singd.structures._linalg`), not by arithmetic, so
the per-layer loop of :func:`~singd.functional.factors.update_factors` and
:func:`~singd.functional.precondition.natural_gradient` costs a fixed price per
layer. The functions here do the same arithmetic for a whole list of layers with a
number of operations that does not grow with the number of layers — the pattern of
``torch.optim``'s ``_multi_tensor_adam``:

* **Diagonal factors** (:class:`DiagonalGroup`): every diagonal of a list of layers
  (whatever their sizes) is concatenated into one vector, and the per-layer
  reductions (average traces, :math:`\|m\|_\infty`, finiteness) are segment
  reductions (``torch.segment_reduce``) over it. The refresh is then about fifty
  operations for any number of layers; the preconditioning :math:`C C^\top G K K^\top
  = (c^2 \otimes k^2) \odot G` is two ``torch._foreach_mul`` over all gradients,
  with :math:`c^2` and :math:`k^2` kept in one buffer refreshed with the factors.
* **Any structure**: :func:`commit_if_finite` makes the non-finite rollback
  branch-free: each stored tensor becomes ``torch.where(finite, new, old)`` on the
  device, so nothing is read back to the host.

The arithmetic is the one of :mod:`singd.functional.factors` (same formulas, same
order of the rounding steps except for the sums inside the average traces, which
are segment sums); ``tests/test_batched.py`` checks both forms against each other and
against the float64 oracle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from singd.functional.factors import FactorHyperparams, FactorState
from singd.structures.base import StructuredMatrix


def all_finite(state: FactorState) -> Tensor:
    """A boolean scalar tensor: every stored entry of K and C is finite (no sync).

    inf/NaN anywhere in H or m reaches :math:`K - \\beta_1 K m` and C, and sums
    propagate inf/NaN, so one float32 sum per stored tensor detects it.
    """
    sums = [t.sum(dtype=torch.float32) for f in (state.K, state.C) for t in f.tensors().values()]
    total = sums[0]
    for s in sums[1:]:  # (fewer operations than stacking for the usual two or three)
        total = total + s
    return _finite(total)


def _finite(x: Tensor) -> Tensor:
    # x − x is 0 for finite x and NaN for ±inf and NaN: two operations instead of
    # isfinite's four (it is composite: eq, abs, ne, and).
    return (x - x).eq(0)


def commit_if_finite(old: FactorState, new: FactorState, finite: Tensor) -> FactorState:
    """``new`` where ``finite`` (a boolean scalar tensor), else ``old``, branch-free.

    Each stored tensor of the result is ``torch.where(finite, new, old)``, computed on
    the device; the host never reads ``finite``. Factors that ``new`` lacks (no
    momentum) stay as ``old`` has them.
    """

    def choose(a: StructuredMatrix | None, b: StructuredMatrix | None) -> StructuredMatrix | None:
        if b is None:
            return a
        if a is None:
            return b
        theirs = a.tensors()
        return b._like(
            {name: torch.where(finite, t, theirs[name]) for name, t in b.tensors().items()}
        )

    K, C = choose(old.K, new.K), choose(old.C, new.C)
    assert K is not None and C is not None
    return FactorState(K=K, C=C, m_K=choose(old.m_K, new.m_K), m_C=choose(old.m_C, new.m_C))


# --- diagonal factors -------------------------------------------------------------------------
@dataclasses.dataclass
class _Segments:
    """Concatenated vectors of ``sizes``: the segment lengths and entry → segment index."""

    sizes: list[int]
    lengths: Tensor  # [L] int64
    index: Tensor  # [N] int64
    inverse_sizes: Tensor  # [L, 1] in the factor dtype: 1/d

    @classmethod
    def build(cls, sizes: list[int], dtype: torch.dtype, device: torch.device) -> _Segments:
        lengths = torch.tensor(sizes, dtype=torch.int64)
        index = torch.repeat_interleave(torch.arange(len(sizes)), lengths)
        inverse = torch.tensor([[1.0 / d] for d in sizes], dtype=torch.float64)
        return cls(
            sizes,
            lengths.to(device),
            index.to(device),
            inverse.to(device=device, dtype=_accumulation_dtype(dtype)),
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


def _diagonals(factors: Iterable[StructuredMatrix | None]) -> list[Tensor]:
    """The stored diagonals of diagonal factors (live tensors)."""
    return [f.tensors()["diag"] for f in factors if f is not None]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision sums of large diagonals overflow (float16) or lose digits
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class DiagonalGroup:
    r"""Layers whose K and C are both diagonal: refreshed and applied all at once.

    Holds, per factor side, the segment layout of the concatenated diagonals and a
    buffer with :math:`k^2` (resp. :math:`c^2`) of every layer, whose per-layer views
    shaped like the gradients make the preconditioning two ``_foreach_mul`` calls.
    The buffers are filled by :meth:`refresh` and by :meth:`load` (after factors
    changed otherwise, e.g. a checkpoint was loaded).

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
        self.K_segments = _Segments.build([d for d, _ in dims], dtype_K, device)
        self.C_segments = _Segments.build([d for _, d in dims], dtype_C, device)
        self.k2 = torch.ones(sum(d for d, _ in dims), dtype=dtype_K, device=device)
        self.c2 = torch.ones(sum(d for _, d in dims), dtype=dtype_C, device=device)
        # views of the buffers shaped to broadcast against [weight, bias] gradients
        self.rows: list[Tensor] = []  # c² as [d_C, 1, …] (weight) and [d_C] (bias)
        self.columns: list[Tensor] = []  # k² as [1, …] (weight) and [] (bias)
        self.has_bias = list(has_bias)
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
        self.rows = weight_rows + bias_rows
        self.columns = weight_columns + bias_columns
        self.ok = torch.ones(len(self.dims), dtype=torch.bool, device=device)
        self._constants: dict[tuple[tuple[float, float], torch.dtype], Tensor] = {}

    def load(self, Ks: Sequence[Tensor], Cs: Sequence[Tensor]) -> None:
        """Fill the :math:`k^2`, :math:`c^2` buffers from the current diagonals."""
        k = torch.cat(list(Ks))
        c = torch.cat(list(Cs))
        torch.mul(k, k, out=self.k2)
        torch.mul(c, c, out=self.c2)

    def refresh(
        self,
        states: Sequence[FactorState],
        H_Ks: Sequence[StructuredMatrix],
        H_Cs: Sequence[StructuredMatrix],
        hp: FactorHyperparams,
        h_c_unscale: float = 1.0,
        *,
        raw: bool = False,
    ) -> Tensor:
        r"""One factor update of every layer, in place; returns the ``[L]`` finite flags.

        ``H_Ks``, ``H_Cs`` are :math:`\hat\Pi(K^\top U K)`, :math:`\hat\Pi(C^\top G C)`,
        or with ``raw`` the diagonals of U and G (then :math:`k^2 \odot
        \operatorname{diag}(U)` is formed here, for all layers in one operation).

        The arithmetic of :func:`~singd.functional.factors.update_factors` on the
        concatenated diagonals. A layer whose new K or C has inf/NaN keeps its K, C,
        m_K, m_C (branch-free: ``torch.where`` on the device); its flag is False.
        """
        momentum = hp.alpha1 != 0.0
        K_side = self._side(
            [s.K for s in states],
            [s.m_K for s in states] if momentum else None,
            H_Ks,
            self.K_segments,
            raw,
        )
        C_side = self._side(
            [s.C for s in states],
            [s.m_C for s in states] if momentum else None,
            H_Cs,
            self.C_segments,
            raw,
        )
        (k, hk, _, stats_K), (c, hc, _, stats_C) = K_side[:4], C_side[:4]
        # stats: [L, 2] columns (average trace of H, average trace of MᵀM)
        if hp.kfac_like:
            # m_K ∝ H_K + λ·KᵀK; m_C ∝ u·H_C + λ·CᵀC
            mixed_K = (K_side[4] * self._constant((1.0, hp.damping), hk)).sum(1)
            mixed_C = (C_side[4] * self._constant((h_c_unscale, hp.damping), hc)).sum(1)
        else:
            # m_K ∝ u·tr(H_C)·H_K + λ·tr(CᵀC)·KᵀK; m_C ∝ u·tr(H_K)·H_C + λ·tr(KᵀK)·CᵀC
            weights = self._constant((h_c_unscale, hp.damping), stats_K)
            coef_K = (stats_C * weights.to(stats_C.dtype)).to(hk.dtype)  # [L, 2]
            coef_C = (stats_K * weights).to(hc.dtype)
            mixed_K = (K_side[4] * self.K_segments.spread(coef_K)).sum(1)
            mixed_C = (C_side[4] * self.C_segments.spread(coef_C)).sum(1)
        scale = 0.5 * (1.0 - hp.alpha1) if hp.normalize_lr_cov else 0.5
        new_mK = mixed_K.sub_(1.0).mul_(scale)
        new_mC = mixed_C.sub_(1.0).mul_(scale)
        mk, mc = K_side[5], C_side[5]
        if mk is not None and mc is not None:
            new_mK.add_(mk, alpha=hp.alpha1)
            new_mC.add_(mc, alpha=hp.alpha1)
        new_k = self._step(k, new_mK, self.K_segments, hp)
        new_c = self._step(c, new_mC, self.C_segments, hp)
        # per-layer finiteness: float32 segment sums of the new K and C
        sums = self.K_segments.sums(new_k.to(torch.float32)) + self.C_segments.sums(
            new_c.to(torch.float32)
        )
        ok = _finite(sums)
        ok_k, ok_c = self.K_segments.spread(ok), self.C_segments.spread(ok)
        new_k = torch.where(ok_k, new_k, k)
        new_c = torch.where(ok_c, new_c, c)
        torch._foreach_copy_(_diagonals(s.K for s in states), new_k.split(self.K_segments.sizes))
        torch._foreach_copy_(_diagonals(s.C for s in states), new_c.split(self.C_segments.sizes))
        if mk is not None and mc is not None:
            new_mK = torch.where(ok_k, new_mK, mk)
            new_mC = torch.where(ok_c, new_mC, mc)
            torch._foreach_copy_(
                _diagonals(s.m_K for s in states), new_mK.split(self.K_segments.sizes)
            )
            torch._foreach_copy_(
                _diagonals(s.m_C for s in states), new_mC.split(self.C_segments.sizes)
            )
        torch.mul(new_k, new_k, out=self.k2)
        torch.mul(new_c, new_c, out=self.c2)
        self.ok = ok
        return ok

    def _constant(self, values: tuple[float, float], like: Tensor) -> Tensor:
        """``values`` as a tensor like ``like``, made once (creating one each refresh
        would be a host-to-device copy)."""
        key = (values, like.dtype)
        cached = self._constants.get(key)
        if cached is None:
            cached = torch.tensor(values, dtype=like.dtype, device=like.device)
            self._constants[key] = cached
        return cached

    def _side(
        self,
        factors: list[StructuredMatrix],
        momenta: list[StructuredMatrix | None] | None,
        Hs: Sequence[StructuredMatrix],
        segments: _Segments,
        raw: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Concatenated (diagonal, H, diagonal², average traces [L, 2], [H | diag²], m)."""
        diag = torch.cat([f.tensors()["diag"] for f in factors])
        H = torch.cat([h.tensors()["diag"].to(diag.dtype) for h in Hs])
        squares = diag * diag
        if raw:  # Π(KᵀUK) = k² ⊙ diag(U) (DiagonalMatrix.from_inner_diagonal)
            H = squares * H
        both = torch.stack([H, squares], 1)  # [N, 2]
        work = _accumulation_dtype(diag.dtype)
        traces = segments.sums(both.to(work)).mul_(segments.inverse_sizes)
        m = None
        if momenta is not None:
            m = torch.cat([mm.tensors()["diag"] for mm in momenta if mm is not None])
        return diag, H, squares, traces, both, m

    @staticmethod
    def _step(factor: Tensor, m: Tensor, segments: _Segments, hp: FactorHyperparams) -> Tensor:
        """:math:`K - \\beta_1 K m` (same rounding as the per-matrix form)."""
        if hp.normalize_lr_cov:
            norms = segments.maxima(m.abs()).clamp_min_(1.0)
            beta = segments.spread(norms.reciprocal_().mul_(-hp.lr_cov))
            return (factor * m).mul_(beta).add_(factor)
        return (factor * m).mul_(-hp.lr_cov).add_(factor)

    def precondition(self, grads: Sequence[Tensor]) -> list[Tensor]:
        r""":math:`(c^2 \otimes k^2) \odot G` for the gradients ``[weights…, biases…]``
        (weights of every layer first, then the biases of the layers with a bias; the
        order of the constructor's layers), in two operations."""
        scaled = torch._foreach_mul(list(grads), self.rows)
        torch._foreach_mul_(scaled, self.columns)
        return list(scaled)
