r"""The KFAC baseline's statistics update, as pure functions (paper Fig. 3, left).

Every T steps, with β₁ the EMA weight (``lr_cov``) and λ the damping:

.. math::
    S_K \leftarrow (1-\beta_1) S_K + \beta_1 U, \quad
    S_C \leftarrow (1-\beta_1) S_C + \beta_1 G, \quad
    P_K = (S_K + \lambda I)^{-1}, \quad P_C = (S_C + \lambda I)^{-1}

and every step the preconditioned gradient is :math:`P_C \nabla W P_K`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.functional.scalars import Scalar


def ema_update(S: Tensor, stat: Tensor, beta1: Scalar) -> Tensor:
    """:math:`(1-\\beta_1) S + \\beta_1 \\cdot` ``stat``."""
    return S * (1.0 - beta1) + stat.to(S.dtype) * beta1


def damped_inverse(S: Tensor, damping: float, dtype: torch.dtype) -> Tensor:
    r""":math:`(S + \lambda I)^{-1}`, computed in ``dtype`` and cast back to ``S.dtype``.

    Half-precision inverses are not available in PyTorch's linear algebra; for
    ``bfloat16``/``float16`` the inverse is computed in float32 and rounded to the
    requested dtype (so a "bf16 inverse" carries bf16 rounding of the result).
    """
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    M = S.to(work, copy=True)
    M.diagonal().add_(damping)
    # inv_ex: no singularity check, which would read its result on the host (a device
    # synchronisation); a singular or non-finite M gives inf/NaN, which the refresh's
    # finiteness check catches.
    return torch.linalg.inv_ex(M).inverse.to(dtype).to(S.dtype)
