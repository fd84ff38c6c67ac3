r"""CPUs: the parameter step written in place at the commit (:mod:`singd.optim.guard`).

A step is whole or nothing, so on accelerators new parameters and momenta are computed
out of place, checked, and committed branch-free. On a CPU that costs twice: a fresh
parameter-sized tensor pays its page faults (a 512 × 785 add, one thread: 192 µs into a
fresh tensor, 69 µs in place) and the commit copies it once more. But there the verdict
is read on the host for free, and the step's inputs can be read too: if the max-abs of
the parameters, their directions and momenta prove the step finite
(:func:`~singd.functional.parameter_step_stays_finite`), the step cannot change the
verdict and is written in place at the commit, if the step is ok
(:meth:`~singd.optim.guard.StepGuard.on_commit`): the same values, bit for bit, as the
out-of-place step and its copy.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from singd.functional import parameter_step_, parameter_step_stays_finite
from singd.functional.scalars import Scalar
from singd.optim.guard import StepGuard, max_abs_on_cpu


def step_at_commit(
    guard: StepGuard,
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor] | None,
    *,
    lr: Scalar,
    momentum: float,
    weight_decay: float,
) -> bool:
    """Register the parameter step of ``params`` (:func:`~singd.functional.parameter_step_`,
    which consumes ``directions``) to run in place at ``guard``'s commit, and return
    True, where the guard :meth:`~singd.optim.guard.StepGuard.writes_in_place` and the
    step is proven finite. Otherwise (a bound not proven: inf/NaN, or values near the
    dtype's largest; a tensor ``lr``; accelerators, compiled code, DTensors) False: the
    caller computes the step out of place and has the guard check it.
    """
    if isinstance(lr, Tensor) or not guard.writes_in_place(params):
        return False
    n = len(params)
    maxima = max_abs_on_cpu(params + directions + (buffers or []), torch.float64).tolist()
    for i, (p, d) in enumerate(zip(params, directions, strict=True)):
        dtypes = [p.dtype, d.dtype] + ([buffers[i].dtype] if buffers else [])
        if not parameter_step_stays_finite(
            maxima[i],
            maxima[n + i],
            maxima[2 * n + i] if buffers else 0.0,
            lr=float(lr),
            momentum=momentum,
            weight_decay=weight_decay,
            largest=min(torch.finfo(dtype).max for dtype in dtypes),
        ):
            return False
    update = functools.partial(
        parameter_step_,
        params,
        directions,
        buffers,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    guard.on_commit(update)
    return True
