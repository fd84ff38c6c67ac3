"""The branch-free select of a step's commit: ``out ← where(ok, new, old)`` for many
tensors, with no host branch (:mod:`singd.optim.guard`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from singd.structures import _linalg


def where_into(out: Tensor, condition: Tensor, a: Tensor, b: Tensor) -> None:
    """``out ← where(condition, a, b)``: one kernel eagerly; compiled code cannot write
    ``out=`` into a non-contiguous tensor, so there it copies (Inductor fuses the two)."""
    if torch.compiler.is_compiling():
        out.copy_(torch.where(condition, a, b))
    else:
        torch.where(condition, a, b, out=out)


#: A branch-free commit selects small tensors of one shape and dtype together when there
#: are at least this many: ``stack`` the new and the old values, one ``where``,
#: ``unbind`` and one ``_foreach_copy_`` (five operations, four kernels) instead of one
#: ``where`` per tensor. So the commit of equal layers (their parameters and momentum
#: buffers) costs operations per distinct shape, not per layer.
STACKED_COMMIT_MIN_TENSORS = 5

#: ... and at most this many numbers each: there the kernel launch, not the memory
#: traffic, is the cost (the stacked select reads and writes each value about three
#: times as often, and needs two stacks of scratch memory); larger tensors keep their
#: own ``where``.
STACKED_COMMIT_MAX_NUMEL = 1 << 16


def where_all_into(
    outs: Sequence[Tensor], condition: Tensor, a: Sequence[Tensor], b: Sequence[Tensor]
) -> None:
    """``outs[i] ← where(condition, a[i], b[i])`` for all ``i`` (each ``outs[i]`` is
    ``a[i]`` or ``b[i]``): groups of small tensors of one shape, dtype and device
    through one stacked ``where`` (:data:`STACKED_COMMIT_MIN_TENSORS`), the others one
    by one. The same values either way: ``where`` only selects."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, out in enumerate(outs):
        small = out.numel() <= STACKED_COMMIT_MAX_NUMEL and not _linalg.tracing()
        key = (out.shape, out.dtype, out.device) if small else ("alone", i)
        groups.setdefault(key, []).append(i)
    conditions: dict[torch.device, Tensor] = {}
    for members in groups.values():
        device = outs[members[0]].device
        if device not in conditions:
            conditions[device] = condition.to(device)
        cond = conditions[device]
        if len(members) < STACKED_COMMIT_MIN_TENSORS:
            for i in members:
                where_into(outs[i], cond, a[i], b[i])
            continue
        selected = torch.where(
            cond, torch.stack([a[i] for i in members]), torch.stack([b[i] for i in members])
        )
        torch._foreach_copy_([outs[i] for i in members], list(selected.unbind(0)))
