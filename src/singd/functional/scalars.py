"""Hyper-parameters that change between steps: Python numbers, or 0-d device tensors.

Eagerly the learning rate η, β₁ (``lr_cov``), the gradient scale and the factor
:math:`u` that un-scales :math:`H_C` are Python floats. A compiled step
(:meth:`singd.optim.phases.StepPhasesMixin.compile`) gets them as 0-d tensors on the
parameters' device instead, like ``torch.optim``'s compiled optimizers take a tensor
``lr``: a graph specialised on a float would recompile whenever a scheduler or a
``GradScaler`` changes it. The update rules accept either; they only branch on a
value (to skip a multiplication by 1) when it is a number, since branching on a
device value would read it back to the host.
"""

from __future__ import annotations

from torch import Tensor

#: A hyper-parameter as the update rules take it (module docstring).
Scalar = float | Tensor


def is_one(value: Scalar) -> bool:
    """Whether ``value`` is the number 1 (a tensor never is: it is not read)."""
    return not isinstance(value, Tensor) and value == 1.0
