"""Nothing a user trains is lost (issue 14): the optimizer-level guarantees.

Whole-or-nothing steps, validated checkpoint loads, layers unused in a step, every
trainable parameter trained, float16 factors that do not overflow the update.
"""

from __future__ import annotations

import torch

from singd.functional import kfac_natural_gradient, natural_gradient
from singd.structures import parse_structure

F64 = torch.float64


def test_float16_factors_do_not_overflow_the_natural_gradient() -> None:
    """CCᵀ G KKᵀ above float16's 65504 (the issue's 95 631) comes out finite and right."""
    torch.manual_seed(0)
    d_o, d_K = 4, 6
    G = 25.0 * torch.rand(d_o, d_K)  # gradients ≤ 25
    for name in ("dense", "diagonal"):
        structure = parse_structure(name)
        K = structure.from_dense(20.0 * torch.eye(d_K) + 0.5).to(torch.float16)
        C = structure.from_dense(3.0 * torch.eye(d_o) + 0.2).to(torch.float16)
        N = natural_gradient(K, C, G)
        K64, C64 = K.to_dense().to(F64), C.to_dense().to(F64)
        exact = C64 @ C64.T @ G.to(F64) @ K64 @ K64.T
        assert exact.abs().max() > 65504  # would overflow in float16
        assert torch.isfinite(N).all()
        torch.testing.assert_close(N.to(F64), exact, rtol=1e-5, atol=0)
    P_K = (400.0 * torch.eye(d_K)).to(torch.float16)
    P_C = (20.0 * torch.eye(d_o)).to(torch.float16)
    N = kfac_natural_gradient(P_K, P_C, G)
    assert torch.isfinite(N).all() and N.abs().max() > 65504
