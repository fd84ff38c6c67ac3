r"""Gradient-scale bookkeeping for ``torch.amp.GradScaler`` (spec §5).

With a scaler, the backward pass of step :math:`t` carries gradients scaled by
:math:`s_t`, but the scale is only revealed to the optimizer in ``step()``. The
hooks therefore divide the output gradients by :math:`\sqrt{s_{t-1}}` (the last
known scale), which keeps :math:`g g^\top` from overflowing in half precision, so

.. math:: H_C \propto s_t^2 / s_{t-1}, \qquad u := s_{t-1} / s_t^2

is the factor that removes the scale when :math:`H_C` enters the update, and the
gradient matrix itself is divided by :math:`s_t`. Before the first step
:math:`s_{-1}` is ``init_grad_scale`` (pass your scaler's initial scale, e.g. 65536).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


class GradScaleTracker:
    """Remembers the scales :math:`s_{t-1}` and :math:`s_t` around each step."""

    def __init__(self, init_grad_scale: float) -> None:
        if not (math.isfinite(init_grad_scale) and init_grad_scale > 0):
            raise ValueError(f"init_grad_scale must be positive and finite, got {init_grad_scale}.")
        self.init_grad_scale = float(init_grad_scale)
        self.scales: dict[int, float] = {-1: self.init_grad_scale}
        self._warned = False

    def previous(self, step: int) -> float:
        """:math:`s_{t-1}` for the step :math:`t` whose backward pass is running."""
        return self.scales.get(step - 1, 1.0)

    def set_current(self, step: int, scale: float) -> None:
        """Inject :math:`s_t` (when emulating a scaler, or from a custom loop)."""
        self.scales[step] = float(scale)

    def observe(self, step: int, grad_scale: Tensor | float | None) -> float:
        """Fix :math:`s_t` at ``step()`` time: injected value, else the scaler's, else 1."""
        if step not in self.scales:
            self.scales[step] = 1.0 if grad_scale is None else float(grad_scale)
        scale = self.scales[step]
        if step == 0 and scale != self.init_grad_scale and not self._warned:
            self._warned = True
            warnings.warn(
                f"The first gradient scale is {scale}, but init_grad_scale={self.init_grad_scale}. "
                "Pass the GradScaler's initial scale as init_grad_scale (e.g. 65536.0) so that "
                "the first curvature update is un-scaled correctly.",
                stacklevel=3,
            )
        return scale

    def forget(self, step: int) -> None:
        """Drop :math:`s_t` of a skipped step: the retry observes its own scale."""
        self.scales.pop(step, None)

    def rebase(self, provisional: int, corrected: int) -> None:
        """Renumber after skipped steps were found late (:mod:`singd.optim.guard`).

        The backward pass of the coming step ran as step ``provisional``, its hooks
        dividing by :math:`s_{\text{provisional}-1}`; it is step ``corrected`` now,
        so that scale becomes :math:`s_{\text{corrected}-1}`, and a scale injected
        for the coming step moves with it.
        """
        shift = provisional - corrected
        kept = {k: v for k, v in self.scales.items() if k >= provisional - 1}
        self.scales = {k - shift: v for k, v in kept.items()}

    def h_c_unscale(self, step: int) -> float:
        """:math:`u = s_{t-1}/s_t^2`."""
        return self.previous(step) / self.scales[step] ** 2

    def end_step(self, next_step: int) -> None:
        """Forget scales that no later step needs."""
        self.scales = {k: v for k, v in self.scales.items() if k >= next_step - 1}


def resolve_grad_scale(optimizer: Any, tracker: GradScaleTracker, t: int) -> float:
    """Fix :math:`s_t` of ``optimizer``'s step ``t``; return what the gradients must be
    divided by (1 if they are unscaled).

    ``GradScaler.step`` sets ``optimizer.grad_scale`` (gradients still scaled) unless
    the user called ``scaler.unscale_`` first (e.g. to clip): then ``grad_scale`` is
    None, the gradients are unscaled, but the curvature statistics still carry the
    scale, which is then read from the optimizer's ``grad_scaler``.

    Raises:
        RuntimeError: If the gradients were unscaled and there is no ``grad_scaler``.
    """
    grad_scale = getattr(optimizer, "grad_scale", None)
    scaler = optimizer.grad_scaler
    unscaled = grad_scale is None and hasattr(optimizer, "found_inf")
    if unscaled:
        if scaler is None:
            raise RuntimeError(
                "scaler.unscale_(optimizer) was called before scaler.step(optimizer) "
                "(e.g. to clip gradients), so the optimizer cannot see the gradient "
                f"scale its curvature statistics carry. Construct {type(optimizer).__name__}"
                "(..., grad_scaler=scaler) so it can read the scale."
            )
        grad_scale = scaler.get_scale()
    elif grad_scale is None and scaler is not None and scaler.is_enabled():
        grad_scale = scaler.get_scale()  # a manual loop without scaler.step
    scale = tracker.observe(t, grad_scale)
    return 1.0 if unscaled else scale


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Turn autocast off on every device type (the optimizer picks its own dtypes)."""
    enabled = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    if not enabled:  # the common case: no context to enter (this runs in every hook)
        yield
        return
    with contextlib.ExitStack() as stack:
        for device_type in enabled:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
