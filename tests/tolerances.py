"""The one tolerance table of the test suite, and the comparison helper that uses it.

Every numerical comparison in the tests takes its tolerance from here: by dtype for
comparisons against a float64 oracle, or by a named scenario where an analytic error
bound replaces round-off (each entry says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: (rtol, atol) for comparing a computation in `dtype` against an exact reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    # bf16 keeps 8 mantissa bits (ε ≈ 7.8e-3): a few roundings of O(1) values.
    torch.bfloat16: (5e-2, 1e-2),
    # fp16 keeps 11 mantissa bits (ε ≈ 9.8e-4).
    torch.float16: (1e-2, 1e-3),
}

#: Trajectories over many optimizer steps accumulate round-off; the published
#: implementation's own tests compare 30-step float32 runs at these values.
TRAJECTORY_FLOAT32: tuple[float, float] = (1e-5, 5e-7)

#: FSDP2 with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` against
#: one float32 process: forward and backward run in bfloat16 (ε ≈ 7.8e-3), so gradients
#: and curvature statistics carry a few bfloat16 roundings, which three steps through the
#: preconditioner carry into the parameter updates. Norm-wise relative error of all the
#: updates together (Δθ over the run); measured on 2 ranks: 0.030 (cnn, INGD) and 0.011
#: (transformer, KFAC); the bound is twice the larger. A wrong reduction (averaged
#: instead of summed, one rank's data only) is off by O(1).
MIXED_PRECISION_BF16: float = 0.06

#: Triangular Toeplitz through FFTs (float32, d above the direct route's limit, CPU
#: FFTs and cuFFT alike): an FFT product is accurate norm-wise, each output off by about
#: ε·log₂L·‖t‖‖x‖ whatever its own size, and the last lags (sums of a few products)
#: are divided by their small counts d − k, so relative to the largest entry they can
#: be off by several times ε·log₂L. Measured worst over 73 random cases, d = 300…3000,
#: 3–64 columns: 4.6e-6 (cuFFT on an H200: 2.2e-6 at d = 64); without the last 64 lags
#: summed directly (toeplitz.EXACT_LAGS) it was 1.6e-5 to 1.8e-5 at d ≥ 1153, which
#: this entry rejects.
#: (rtol, atol), atol relative to the largest entry.
TOEPLITZ_FFT_FLOAT32: tuple[float, float] = (1e-5, 1e-5)

#: Theorem 1 (spec §2): after one refresh from matching factors, IKFAC's K Kᵀ is
#: KFAC's (S + λI)⁻¹ up to O(β₁²), so the log-log slope of the error over
#: β₁ ∈ {1e-1, …, 1e-3} is 2; the interval leaves room for the O(β₁³) term at
#: β₁ = 0.1 (measured 1.89–1.97), while a first-order error (slope 1, e.g. the ½
#: factor dropped) is far outside it.
THEOREM1_SLOPE: tuple[float, float] = (1.8, 2.2)


#: resnet18 in channels_last against the contiguous layout, float64, two steps: the
#: layouts use different convolution kernels (summation orders); BatchNorm amplifies
#: their round-off (5e-13 relative in the first gradient), measured 6e-12 relative to the
#: largest entry of a parameter after two steps. Norm-wise (max |Δ| / max |p|).
CHANNELS_LAST_FLOAT64: float = 1e-9


#: bfloat16 parameters, the compiled step (``aot_eager``) against the eager one over four
#: steps with a scheduled ``lr`` (``tests/test_compile.py``): the fraction of the elements
#: of parameters, momenta and factors that may differ (each by a few bfloat16 roundings:
#: the bfloat16 row bounds them). Both compute μ − ηΔ in float32 and round once, with η
#: rounded to bfloat16 on the CPU (:func:`singd.functional.scalars.minus_scaled`):
#: measured, no element differs (diagonal SINGD with SGD, and with AdamW, on the
#: fallback rule). The bound leaves room for float32 multiply-adds fused on one side
#: only, and for a traced refresh that rounds a few elements differently (INGD's dense
#: factors: 53 of 59 816 elements, 0.09 %). A tensor η multiplied in bfloat16 before
#: the difference (the product rounded first) makes 0.4 % of the elements differ after
#: one step and 13–17 % after four; η not rounded to bfloat16, 12 %. The test's tensors
#: have multiples of 64 elements: past its vectorised part, ATen's CPU kernel rounds the
#: last elements of a tensor like that product (rounded first).
COMPILED_BF16_DIFFERING: float = 0.01


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``{"rtol": …, "atol": …}`` for ``dtype``, ready for ``torch.testing.assert_close``."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype | None = None,
    msg: str = "",
    tol: tuple[float, float] | None = None,
) -> None:
    """Compare in float64 with the tolerance of ``dtype`` (default: ``actual.dtype``), or
    with ``tol`` = (rtol, atol), a named entry of this table."""
    rtol, atol = TOLERANCES[dtype or actual.dtype] if tol is None else tol
    torch.testing.assert_close(
        actual.detach().to(torch.float64),
        expected.detach().to(torch.float64),
        rtol=rtol,
        atol=atol,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )
