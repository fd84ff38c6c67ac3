r"""Hyper-parameters that change between steps: Python numbers, or 0-d device tensors.

Eagerly the learning rate η, β₁ (``lr_cov``), the gradient scale and the factor
:math:`u` that un-scales :math:`H_C` are Python floats. A compiled step
(:meth:`singd.optim.phases.StepPhasesMixin.compile`) gets them as 0-d tensors on the
parameters' device instead, like ``torch.optim``'s compiled optimizers take a tensor
``lr``: a graph specialised on a float would recompile whenever a scheduler or a
``GradScaler`` changes it. The update rules accept either; they only branch on a
value (to skip a multiplication by 1) when it is a number, since branching on a
device value would read it back to the host.

**Rounding.** ``alpha=`` takes only numbers, so with a tensor η the step
:math:`\mu - \eta\Delta` is a product and a difference (:func:`minus_scaled`). For
float32 and float64 parameters they round as ``alpha=`` does, to round-off. For
bfloat16 and float16 they would not: type promotion keeps the product in the
parameter's dtype and rounds it before the difference, while ``alpha=`` computes
:math:`\mu - \eta\Delta` in float32 and rounds once (on the CPU with η rounded to the
parameter's dtype first, and, for the last elements of a tensor past its vectorised
part, the product rounded first too). So :func:`minus_scaled` computes those in float32
and rounds once, with η rounded as the device's kernel rounds ``alpha``:
``tests/test_compile.py`` measures the compiled step against eager with bfloat16
parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: A hyper-parameter as the update rules take it (module docstring).
Scalar = float | Tensor


def is_one(value: Scalar) -> bool:
    """Whether ``value`` is the number 1 (a tensor never is: it is not read)."""
    return not isinstance(value, Tensor) and value == 1.0


#: Floating dtypes narrower than float32, whose arithmetic ATen does in float32.
REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def minus_scaled(params: list[Tensor], directions: list[Tensor], lr: Scalar) -> list[Tensor]:
    r""":math:`\mu - \eta\,\Delta` of every pair, as new tensors, rounded as
    ``torch._foreach_add(params, directions, alpha=-lr)`` rounds (module docstring).

    With a number ``lr`` that is the operation. With a 0-d tensor, reduced-precision
    pairs are computed in float32 and rounded once to the parameter's dtype; on the
    CPU with η rounded to that dtype first, as ATen's CPU kernel rounds ``alpha``
    (CUDA's keeps it in float32).
    """
    if not isinstance(lr, Tensor):
        return list(torch._foreach_add(params, directions, alpha=-lr))
    reduced = [p.dtype in REDUCED_PRECISION for p in params]
    if not any(reduced):
        return list(torch._foreach_sub(params, torch._foreach_mul(directions, lr)))
    out = list(params)
    wide = [i for i, r in enumerate(reduced) if not r]
    if wide:
        new = torch._foreach_sub(
            [params[i] for i in wide], torch._foreach_mul([directions[i] for i in wide], lr)
        )
        for i, t in zip(wide, new, strict=True):
            out[i] = t
    for i, is_reduced in enumerate(reduced):
        if is_reduced:
            p = params[i]
            eta = lr.to(p.dtype).float() if p.device.type == "cpu" else lr.float()
            out[i] = (p.float() - directions[i].float() * eta).to(p.dtype)
    return out
