r"""Gradient-scale bookkeeping for ``torch.amp.GradScaler`` (spec §5).

With a scaler, the backward pass of step :math:`t` carries gradients scaled by
:math:`s_t`, but the scale is only revealed to the optimizer in ``step()``. The
hooks therefore divide the output gradients by :math:`\sqrt{s_{t-1}}` (the last
known scale), which keeps :math:`g g^\top` from overflowing in half precision, so

.. math:: H_C \propto s_t^2 / s_{t-1}, \qquad u := s_{t-1} / s_t^2

is the factor that removes the scale when :math:`H_C` enters the update, and the
gradient matrix itself is divided by :math:`s_t`. Before the first step
:math:`s_{-1}` is ``init_grad_scale`` (1 unless set; any value is exact, the scaler's
initial scale only keeps the first statistics small).

**Finding the scale.** Training frameworks create the ``GradScaler`` after the
optimizer (accelerate / HF ``Trainer``, Lightning) and call ``scaler.unscale_(optim)``
before ``scaler.step(optim)`` to clip or log the gradient norm. Once ``unscale_`` has
run, torch tells the optimizer nothing about the scale, and no observation of the
gradients can recover it (clipping multiplies them by an unknown factor too). So
:func:`notify_unscale` wraps ``torch.amp.GradScaler.unscale_`` once (the wrapper calls
torch's method unchanged, then tells a Kronecker optimizer which scaler unscaled its
gradients): the optimizer reads :math:`s_t` from that scaler in ``step()``, and when the
scaler found inf/NaN (it will then skip ``optimizer.step()``) drops that step's
statistics. Kronecker optimizers therefore leave ``_step_supports_amp_scaling`` False
and follow torch's default protocol, so ``scaler.step`` unscales the gradients itself,
and frameworks that refuse to clip for optimizers that unscale internally (Lightning)
accept them. A ``GradScaler`` subclass that overrides ``unscale_`` without calling it
(FSDP1's ``ShardedGradScaler``) is not seen: pass it as ``grad_scaler=``.
"""

from __future__ import annotations

import contextlib
import functools
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

    def observe(
        self, step: int, grad_scale: Tensor | float | None, *, overflow_risk: bool = True
    ) -> float:
        """Fix :math:`s_t` at ``step()`` time: injected value, else the scaler's, else 1.

        A first scale other than ``init_grad_scale`` is exact; it is warned about only
        where the unscaled first statistics could overflow (``overflow_risk``: float16).
        """
        if step not in self.scales:
            self.scales[step] = 1.0 if grad_scale is None else float(grad_scale)
        scale = self.scales[step]
        if step == 0 and scale != self.init_grad_scale and overflow_risk and not self._warned:
            self._warned = True
            warnings.warn(
                f"The first gradient scale is {scale}, but init_grad_scale={self.init_grad_scale}: "
                "the first float16 curvature statistics carry the whole scale and may overflow. "
                "Pass the GradScaler's initial scale as init_grad_scale (e.g. 65536.0).",
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

    After ``scaler.unscale_(optimizer)`` (inside ``scaler.step``, or called first to
    clip) the gradients are unscaled, but the curvature statistics still carry the
    scale, which is read from that scaler (:func:`notify_unscale`). A caller that sets
    ``optimizer.grad_scale`` / ``found_inf`` itself (the protocol of optimizers that
    unscale internally) is still followed: ``grad_scale`` means scaled gradients,
    ``grad_scale=None`` with ``found_inf`` unscaled ones, whose scale comes from the
    optimizer's ``grad_scaler``. Without either, an attached enabled ``grad_scaler``
    means a manual loop whose gradients are still scaled.

    Raises:
        RuntimeError: If the gradients were unscaled and there is no ``grad_scaler``.
    """
    scaler = optimizer.grad_scaler
    risk = optimizer._statistics_overflow_risk()
    if optimizer._unscaled_step == t:  # scaler.unscale_ ran (notify_unscale)
        optimizer._unscaled_step = None
        tracker.observe(t, scaler.get_scale(), overflow_risk=risk)
        return 1.0
    grad_scale = getattr(optimizer, "grad_scale", None)
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
    scale = tracker.observe(t, grad_scale, overflow_risk=risk)
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


def notify_unscale() -> None:
    """Wrap ``torch.amp.GradScaler.unscale_`` (once per process; see the module docstring).

    Around torch's own ``unscale_(optimizer)``, an optimizer with ``_before_unscale`` /
    ``_after_unscale`` methods is called with the scaler (before: checks that may
    refuse, e.g. gradients not yet reduced over data-parallel ranks). Other optimizers
    are not affected.
    """
    cls = torch.amp.GradScaler
    if getattr(cls.unscale_, "_singd_notifies", False):
        return
    original = cls.unscale_

    @functools.wraps(original)
    def unscale_(self: torch.amp.GradScaler, optimizer: Any) -> None:
        notify = self.is_enabled() and hasattr(optimizer, "_after_unscale")
        if notify:
            optimizer._before_unscale(self)
        original(self, optimizer)
        if notify:
            optimizer._after_unscale(self)

    unscale_._singd_notifies = True  # type: ignore[attr-defined]
    cls.unscale_ = unscale_  # type: ignore[method-assign]


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: Any) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` found inf/NaN (one host read)."""
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return bool(sum(float(v) for v in found.values()))
