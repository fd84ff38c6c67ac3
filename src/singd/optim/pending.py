r"""Statistics of equal layers formed together, at the end of the backward pass.

The capture hooks hand each layer's input :math:`x` and output gradient :math:`g` to
the optimizer once per forward/backward pass. Formed at once, every layer's
:math:`H_K, H_C` cost the same handful of operations again, which dominates a
launch-bound step of many equal layers (transformer blocks, MLPs, the 3×3
convolutions of a residual stage). So a pass whose
preconditioner names a :meth:`~singd.preconditioners.base.LayerPreconditioner.statistics_key`
waits in :class:`PendingStatistics`, and at the end of the backward pass (an autograd
engine callback, queued by the hook) the passes of each key are
accumulated together
(:meth:`~singd.preconditioners.base.LayerPreconditioner.accumulate_batch`: stacked,
under :func:`torch.vmap`).

Ending with the backward pass keeps the statistics of a pass the same as if they were
formed in its hook: no user code runs in between, so an input buffer refilled in place
for the next micro-batch cannot change them. Holding the tensors until then costs
memory (the output gradients would be freed layer by layer), so a key is also flushed
once its waiting tensors exceed :data:`PENDING_MAX_BYTES`, and everything is flushed
when the optimizer needs the statistics (``step()``, ``GradScaler.unscale_``) or a
layer's second pass arrives before the first was flushed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from torch import Tensor
from torch.autograd import Variable

if TYPE_CHECKING:
    from singd.preconditioners.base import LayerPreconditioner

#: The most bytes of inputs and output gradients one key's waiting passes hold before
#: they are accumulated (the output gradients are memory the backward pass would
#: otherwise free layer by layer).
PENDING_MAX_BYTES = 256 << 20


class PendingStatistics:
    """Passes waiting to be accumulated together, by statistics key (module docstring).

    Args:
        wrap: Runs each flush (e.g. under the optimizer's profiler range and with
            autocast disabled).
    """

    def __init__(self, wrap: Callable[[Callable[[], None]], None]) -> None:
        self._wrap = wrap
        self._waiting: dict[
            tuple[Hashable, float], list[tuple[LayerPreconditioner, Tensor, Tensor]]
        ] = {}
        self._bytes: dict[tuple[Hashable, float], int] = {}

    def add(
        self, key: Hashable, pre: LayerPreconditioner, x: Tensor, g: Tensor, previous_scale: float
    ) -> None:
        """Let a pass wait under ``key`` (flushing it first if ``pre`` already waits)."""
        key = (key, previous_scale)  # (constant within a step; _flush_key reads it back)
        waiting = self._waiting.setdefault(key, [])
        if any(p is pre for p, _, _ in waiting):
            self._flush_key(key)
            waiting = self._waiting.setdefault(key, [])
        waiting.append((pre, x, g))
        size = x.numel() * x.element_size() + g.numel() * g.element_size()
        self._bytes[key] = self._bytes.get(key, 0) + size
        if self._bytes[key] > PENDING_MAX_BYTES:
            self._flush_key(key)
        if not self._waiting:
            return
        # One callback per pass, at the end of the backward pass it belongs to (a
        # callback of a backward pass that raised never runs; the next pass queues its
        # own). Callbacks after the first find nothing waiting.
        try:
            Variable._execution_engine.queue_callback(self.flush)
        except RuntimeError:  # (not inside a backward pass: nothing would end it)
            self.flush()

    def flush(self) -> None:
        """Accumulate every waiting pass (end of the backward pass, or before ``step()``)."""
        for key in list(self._waiting):
            self._flush_key(key)

    def _flush_key(self, key: tuple[Hashable, float]) -> None:
        waiting = self._waiting.pop(key, [])
        self._bytes.pop(key, None)
        scale = key[1]
        if not waiting:
            return
        pres = [p for p, _, _ in waiting]
        xs = [x for _, x, _ in waiting]
        gs = [g for _, _, g in waiting]
        self._wrap(lambda: type(pres[0]).accumulate_batch(pres, xs, gs, scale))
