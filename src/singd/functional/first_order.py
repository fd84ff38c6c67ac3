r"""First-order rules for the parameters that get no Kronecker factors (the fallback).

AdamW (decoupled weight decay; the arithmetic of ``torch.optim.AdamW``), with
:math:`\eta` the learning rate, :math:`\gamma` the weight decay and step count t:

.. math::
    \mu &\leftarrow \mu (1 - \eta\gamma) \\
    m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
    \mu &\leftarrow \mu - \frac{\eta}{1-\beta_1^t}\,
        \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

SGD with heavy-ball momentum and coupled weight decay is
:func:`singd.functional.precondition.apply_parameter_step` with the raw gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from singd.functional.scalars import Scalar


@torch.no_grad()
def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    lr: Scalar,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place; ``states`` hold ``exp_avg``, ``exp_avg_sq``, ``step``.

    Half-precision parameters are updated with float32 arithmetic (their state
    stays in their dtype). Missing state entries are created as zeros (``step``
    as a float32 scalar tensor, like ``torch.optim.AdamW``, so checkpoints are
    interchangeable). ``lr`` may be a 0-d tensor (:mod:`singd.functional.scalars`).
    """
    beta1, beta2 = betas
    for p, g, state in zip(params, grads, states, strict=True):
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        # Half-precision parameters: do the arithmetic in float32 (g² and ε = 1e-8
        # underflow in float16), then store the results in the parameter's dtype.
        half = p.dtype in (torch.float16, torch.bfloat16)
        work = p.float() if half else p
        exp_avg = state["exp_avg"].float() if half else state["exp_avg"]
        exp_avg_sq = state["exp_avg_sq"].float() if half else state["exp_avg_sq"]
        g = g.float() if half else g
        work.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        if isinstance(lr, Tensor):  # (a compiled step's device scalar: value= takes numbers)
            work.sub_(exp_avg.div(denom).mul_(lr / bias_correction1))
        else:
            work.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if half:
            p.copy_(work)
            state["exp_avg"].copy_(exp_avg)
            state["exp_avg_sq"].copy_(exp_avg_sq)
