r"""N-dimensional convolutions (``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``) — one adapter.

A convolution is a linear layer applied to every input *patch*: with
``c = C_in / groups`` and kernel size ``k = (k_1, …)``, :math:`d_i = c \prod k_j`
(+1 for a bias) and :math:`d_o = C_\text{out}`; the output locations are the
shared positions. Input channels are **averaged over groups** first, so one K is
shared by all groups, matching the grouped weight's shape ``[C_out, c, *k]``
(spec §4).

Patches are gathered by strided slicing of the (explicitly) padded input — one
slice per kernel offset — which covers any dimension, stride, dilation, padding
mode and asymmetric ``"same"`` padding. Patch features are channel-major then
kernel-offset row-major, the order of ``weight.flatten(1)`` and ``F.unfold``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from singd.layers.base import LayerAdapter, pad_bias_entry, scaled_with_bias_column
from singd.structures import _linalg


def conv_paddings(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """Per spatial dimension, the (left, right) zero padding the convolution applies."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * len(module.kernel_size)
        # "same": PyTorch pads total = dilation·(k−1), the extra element on the right.
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def pad_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """The input padded exactly as the convolution pads it."""
    pads = conv_paddings(module)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dim first
    if not any(flat):
        return x
    if module.padding_mode == "zeros":
        return F.pad(x, flat)
    return F.pad(x, flat, mode=module.padding_mode)


def group_averaged_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``[B, C_in, *I]`` averaged over channel groups to ``[B, C_in/groups, *I]``."""
    if module.groups == 1:
        return x
    return x.reshape(x.shape[0], module.groups, -1, *x.shape[2:]).mean(1)


def output_size(module: nn.modules.conv._ConvNd, padded: torch.Size) -> list[int]:
    """Output positions per spatial dimension of a padded input of spatial size ``padded``."""
    return [
        (size - d * (k - 1) - 1) // s + 1
        for size, k, d, s in zip(
            padded, module.kernel_size, module.dilation, module.stride, strict=True
        )
    ]


def kernel_slices(module: nn.modules.conv._ConvNd, x_padded: Tensor) -> list[Tensor]:
    """For each kernel offset (row-major), the input entries it multiplies: ``[B, c, *O]``
    views of a ``[B, c, *I]`` input."""
    outs = output_size(module, x_padded.shape[2:])
    slices = []
    for offset in itertools.product(*(range(k) for k in module.kernel_size)):
        index = [slice(None)] * 2
        for o, d, s, n in zip(offset, module.dilation, module.stride, outs, strict=True):
            index.append(slice(o * d, o * d + s * (n - 1) + 1, s))
        slices.append(x_padded[tuple(index)])
    return slices


_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


_WINDOWS: dict[tuple[tuple[int, ...], float, torch.dtype, torch.device], Tensor] = {}


def _window(outs: list[int], scale: float, like: Tensor) -> Tensor:
    """A ``[1, 1, *outs]`` window filled with ``scale``, made once per shape (a new one at
    every call would be one more operation per layer and step)."""
    key = (tuple(outs), scale, like.dtype, like.device)
    window = _WINDOWS.get(key)
    if window is None:
        if len(_WINDOWS) >= 64:
            _WINDOWS.clear()
        window = _WINDOWS[key] = torch.full(
            (1, 1, *outs), scale, dtype=like.dtype, device=like.device
        )
    return window


def patch_sums(
    module: nn.modules.conv._ConvNd, x: Tensor, scale: float = 1.0, *, padded: bool = True
) -> Tensor:
    r"""Every patch entry summed over the output positions (times ``scale``):
    ``[B·c, 1, *k]`` from ``[B, c, *I]``.

    Entry :math:`(c, \delta)` of the patch at output position :math:`p` is
    :math:`x_c[p s + \delta \cdot \text{dil}]`, so its sum over :math:`p` is a
    correlation of :math:`x_c` with a constant window of the output's size whose taps
    are ``stride`` apart, evaluated every ``dilation``: one convolution (measured 2×
    faster on the benchmark CNN) instead of one reduction per kernel offset. An
    unpadded ``x`` (``padded=False``) is zero-padded by that convolution itself, where
    the layer pads with zeros symmetrically.
    """
    padding: Any = 0
    if not padded:
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            padding = module.padding
        else:
            x = pad_input(module, x)
    B, c, *spatial = x.shape
    padded_size = [n + 2 * p for n, p in zip(spatial, padding or [0] * len(spatial), strict=True)]
    outs = output_size(module, torch.Size(padded_size))
    sums = _CONVOLUTIONS[len(outs)](
        x.reshape(B * c, 1, *spatial),
        _window(outs, scale, x),
        stride=module.dilation,
        dilation=module.stride,
        padding=padding,
    )
    if tuple(sums.shape[2:]) != tuple(module.kernel_size):
        # a stride that does not divide the padded size leaves room for more offsets
        index: tuple[Any, ...] = (Ellipsis, *(slice(0, k) for k in module.kernel_size))
        sums = sums[index]
    return sums


#: On CPUs, the statistics of equal convolutions are formed together only for inputs of
#: at most this many elements: there arithmetic and memory traffic dominate, and past a
#: small input the per-layer forms (patches copied into a preallocated matrix, half
#: Gram products: what ``torch.vmap`` cannot do) beat the batched ones (``F.unfold``,
#: full products). Measured on one thread, op_count's ``resnet8`` (16 equal 3×3
#: convolutions 16→16, batch 32): a training step took 2.3-2.6× (INGD, KFAC) and 4.4×
#: (block_diagonal(30)) as long with them batched on 16×16 inputs (131 072 elements),
#: about as long on 8×8, 0.86-0.92× on 4×4 (8 192). Accelerators batch every size.
CPU_BATCHED_STATISTICS_MAX_NUMEL = 16_384


#: One kernel offset of :func:`_flat_shifts`: the shift δ along the flattened positions,
#: the positions ``[lo, hi)`` whose shifted entry lies inside the input, and their
#: divisors (√rows where the offset reads the input, ∞ where it reads padding).
_Shift = tuple[int, int, int, Tensor]

_SHIFTS: dict[tuple[Hashable, ...], list[_Shift]] = {}


def _flat_shifts(module: nn.modules.conv._ConvNd, x: Tensor) -> list[_Shift] | None:
    r"""Kernel offsets as shifts of the flattened input, or None where they are not.

    With stride 1, zero padding and an output as large as the input (``[B, c, *I]``,
    the usual "same" 3×3 convolution), offset :math:`\delta` of a patch at position
    :math:`p` reads :math:`x[p + r]` with :math:`r_j = \delta_j \text{dil}_j -
    \text{pad}_j`, i.e. entry :math:`p + \sum_j r_j s_j` of the flattened positions
    (:math:`s_j` their strides) unless some :math:`p_j + r_j` falls outside the input,
    where it reads padding: a zero. Positions whose flat shifted index leaves the input
    all read padding. Divided by ∞, the shifted entries that read padding become
    zeros (for finite inputs). float32 and float64 (whose ∞ and √rows a division by
    the tensor of divisors reproduces exactly); cached per geometry.
    """
    spatial = tuple(x.shape[2:])
    if (
        module.padding_mode != "zeros"
        or x.dtype not in (torch.float32, torch.float64)
        or any(s != 1 for s in module.stride)
    ):
        return None
    pads = conv_paddings(module)
    padded = [n + a + b for n, (a, b) in zip(spatial, pads, strict=True)]
    if tuple(output_size(module, torch.Size(padded))) != spatial:
        return None
    L = math.prod(spatial)
    root = math.sqrt(x.shape[0] * L)
    key = (spatial, module.kernel_size, module.dilation, tuple(pads), root, x.dtype, x.device)
    shifts = _SHIFTS.get(key)
    if shifts is not None:
        return shifts
    strides = [math.prod(spatial[j + 1 :]) for j in range(len(spatial))]
    grids = torch.meshgrid(*(torch.arange(n) for n in spatial), indexing="ij")
    shifts = []
    for offset in itertools.product(*(range(k) for k in module.kernel_size)):
        r = [o * d - p for o, d, (p, _) in zip(offset, module.dilation, pads, strict=True)]
        inside = torch.ones(spatial, dtype=torch.bool)
        for grid, r_j, n in zip(grids, r, spatial, strict=True):
            inside &= (grid + r_j >= 0) & (grid + r_j < n)
        delta = sum(r_j * s for r_j, s in zip(r, strides, strict=True))
        lo, hi = max(0, -delta), min(L, L - delta)
        divisor = torch.full(spatial, math.inf, dtype=torch.float64).masked_fill_(inside, root)
        divisor = divisor.reshape(-1)[lo:hi].to(dtype=x.dtype, device=x.device)
        shifts.append((delta, lo, hi, divisor))
    if len(_SHIFTS) >= 64:
        _SHIFTS.clear()
    _SHIFTS[key] = shifts
    return shifts


class ConvAdapter(LayerAdapter[nn.modules.conv._ConvNd]):
    """Adapter for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

    The statistics read the geometry of the convolution besides the shapes (equal
    inputs and output gradients do not fix it: a stride of 4 and of 5 both map
    14 × 14 to 3 × 3 with a 3 × 3 kernel), so it is the statistics signature: equal
    convolutions (a residual stage's 3 × 3 blocks) have their statistics formed
    together (:mod:`singd.optim.pending`).
    """

    statistics_attributes = (
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )

    def statistics_signature(self, x: Tensor) -> Hashable | None:
        """The geometry (:attr:`statistics_attributes`); None for an input of more than
        :data:`CPU_BATCHED_STATISTICS_MAX_NUMEL` elements on a CPU (see there)."""
        if _linalg.splits_work(x) and x.numel() > CPU_BATCHED_STATISTICS_MAX_NUMEL:
            return None
        return super().statistics_signature(x)

    def factor_dims(self) -> tuple[int, int]:
        module = self.module
        # from the shape, not ``weight[0]``: indexing a sharded (DTensor) weight communicates
        d_in = math.prod(module.weight.shape[1:]) + int(module.bias is not None)
        return d_in, module.out_channels

    def _unbatched(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0) if t.ndim == len(self.module.kernel_size) + 1 else t

    def shared_inputs(self, x: Tensor) -> Tensor:
        module = self.module
        x = pad_input(module, group_averaged_input(module, self._unbatched(x)))
        patches = torch.stack(kernel_slices(module, x), dim=2)  # [B, c, K, *O]
        patches = patches.flatten(1, 2).flatten(2)  # [B, c·K, R]
        return patches.transpose(1, 2)

    def expanded_input_matrix(self, x: Tensor) -> Tensor:
        """KFAC-expand's patch matrix written in one pass (the hook's largest tensor).

        Stride-1 convolutions with zero padding and an output as large as the input
        (the usual "same" 3×3) read shifts of the unpadded input instead
        (:meth:`_shifted_input_matrix`: runs of all positions; measured 15.8 → 7.8 ms
        for the benchmark CNN's eight convolutions, one thread). Otherwise each kernel
        offset's slice of the padded input is scaled straight into a
        preallocated result: no unfold, transpose or concat copies. The copy runs
        along whichever of the two layouts has the longer contiguous stretches
        (measured: up to 5× apart): while an output row holds at least as many
        positions as there are channels, ``Aᵀ`` is written row by row from the
        channel-first input (runs of one output row), otherwise ``A`` from
        channels-last views (runs of ``c`` channels). Both give the same numbers.
        Under ``torch.vmap`` (equal layers' statistics formed together), which cannot
        write into views, and on accelerators, it is formed out of place: by
        ``F.unfold`` (2-d), else from the stacked kernel slices.
        """
        module = self.module
        tracing = _linalg.tracing()  # (vmap over equal layers: no out= into views)
        if tracing and len(module.kernel_size) != 2:  # (F.unfold is 2-d only)
            return scaled_with_bias_column(self, self.shared_inputs(x).flatten(0, 1))
        x = group_averaged_input(module, self._unbatched(x))
        if (tracing or not _linalg.splits_work(x)) and len(module.kernel_size) == 2:
            return self._unfolded_input_matrix(x)
        shifts = _flat_shifts(module, x)
        if shifts is not None:
            return self._shifted_input_matrix(x, shifts)
        x = pad_input(module, x)
        c, bias = x.shape[1], module.bias is not None
        channels_first = kernel_slices(module, x)  # views [B, c, *O]
        out_shape = channels_first[0].shape
        rows, K = out_shape[0] * out_shape[2:].numel(), len(channels_first)
        root = math.sqrt(rows)  # divided, not multiplied by 1/√rows: the published rounding
        if out_shape[-1] >= c:
            A_T = x.new_empty(c * K + bias, rows)
            patches = A_T[: c * K].view(c, K, out_shape[0], *out_shape[2:])
            for k, s in enumerate(channels_first):
                torch.div(s.transpose(0, 1), root, out=patches[:, k])
            A = A_T.T
        else:
            slices = [s.movedim(1, -1) for s in channels_first]  # [B, *O, c]
            A = x.new_empty(rows, c * K + bias)
            patches = A[:, : c * K].view(*slices[0].shape[:-1], c, K)
            for k, s in enumerate(slices):
                torch.div(s, root, out=patches[..., k])
        if bias:
            A[:, -1].fill_(1.0).div_(root)
        return A

    def _shifted_input_matrix(self, x: Tensor, shifts: list[_Shift]) -> Tensor:
        """``Aᵀ`` of a stride-1 convolution whose output is as large as its input, from
        the unpadded input (:func:`_flat_shifts`): per kernel offset one division of
        the channel-first input, shifted along its flattened positions, into one row
        block of ``Aᵀ`` (runs of all positions but the shift, instead of one output
        row), and at most two zero fills. The same numbers as the padded slices
        (zeros may carry a sign; next to a non-finite input entry a padding entry
        becomes NaN, with a non-finite statistic either way)."""
        B, c = x.shape[:2]
        L = x.shape[2:].numel()
        bias = self.module.bias is not None
        A_T = x.new_empty(c * len(shifts) + bias, B * L)
        patches = A_T[: c * len(shifts)].view(c, len(shifts), B, L)
        flat = x.reshape(B, c, L).transpose(0, 1)  # [c, B, L]
        root = math.sqrt(B * L)  # (divided: the published rounding, as above)
        for k, (delta, lo, hi, divisor) in enumerate(shifts):
            out = patches[:, k]
            if lo >= hi:
                out.zero_()
                continue
            torch.div(flat[:, :, lo + delta : hi + delta], divisor, out=out[:, :, lo:hi])
            if lo > 0:
                out[:, :, :lo].zero_()
            if hi < L:
                out[:, :, hi:].zero_()
        if bias:
            A_T[-1].fill_(1.0).div_(root)
        return A_T.T

    def _unfolded_input_matrix(self, x: Tensor) -> Tensor:
        """The same ``A`` in a few large operations (accelerators are launch-bound: the
        per-offset copies above cost one operation each): ``F.unfold`` of the padded
        input, scaled, with the bias column padded on."""
        module = self.module
        padding: Any = 0
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            padding = module.padding  # unfold pads with zeros itself: one operation less
        else:
            x = pad_input(module, x)
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        rows = patches.shape[0] * patches.shape[2]
        root = math.sqrt(rows)
        A = (patches / root).transpose(1, 2).reshape(rows, patches.shape[1])  # [B·R, c·K]
        if module.bias is not None:
            A = F.pad(A, (0, 1), value=1.0 / root)
        return A

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        g = self._unbatched(g)
        return g.flatten(2).transpose(1, 2)  # [B, R, C_out]

    def input_diagonal(self, x: Tensor, approx: str) -> Tensor:
        """``diag(AᵀA)`` without unfolding: square, sum over the batch, then sum patches.

        Expand only (reduce averages patches first). Squaring commutes with every
        padding mode (padded entries are zeros or copies of input entries), so the
        batch-summed squares are padded and sliced instead of the input itself.
        """
        module = self.module
        if approx != "expand":
            return super().input_diagonal(x, approx)
        x = group_averaged_input(module, self._unbatched(x))
        squares = x.square().sum(0, keepdim=True)  # [1, c, *I]
        padded = [n + a + b for n, (a, b) in zip(x.shape[2:], conv_paddings(module), strict=True)]
        rows = x.shape[0] * math.prod(output_size(module, torch.Size(padded)))
        diag = patch_sums(module, squares, 1.0 / rows, padded=False).reshape(-1)  # [c·K]
        if module.bias is not None:
            diag = pad_bias_entry(diag)
        return diag

    def grad_output_squares(self, g: Tensor) -> tuple[Tensor, int, int]:
        g = self._unbatched(g)  # [B, C_out, *O]: sums over every dimension but channels
        dims = (0, *range(2, g.ndim))
        return g.square().sum(dims), g.shape[0], math.prod(g.shape[2:])

    def reduced_inputs(self, x: Tensor) -> Tensor:
        """Patches averaged over output locations, ``[B, d_in]``, without unfolding them."""
        module = self.module
        x = pad_input(module, group_averaged_input(module, self._unbatched(x)))
        positions = math.prod(output_size(module, x.shape[2:]))
        return patch_sums(module, x, 1.0 / positions).reshape(x.shape[0], -1)
