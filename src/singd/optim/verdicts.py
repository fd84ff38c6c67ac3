"""The verdicts of guarded steps on their way to the host, and the queue that reads them.

A :class:`Verdict` is what :meth:`singd.optim.guard.StepGuard.verdict` returns: the
per-check results of one step, copied to the host without blocking. The
:class:`VerdictQueue` reads them in order once they have arrived (module docstring of
:mod:`singd.optim.guard`), warns once per skipped step and runs its undo callbacks.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable
from types import FrameType

import torch
from torch import Tensor

_INTERNAL = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside singd and torch (the user's
    ``optimizer.step()`` or ``scaler.step(optimizer)`` call), for warnings."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


@dataclasses.dataclass
class Verdict:
    """The outcome of one guarded step, on its way to the host.

    Attributes:
        step: The step counter the step ran with.
        labels: The label of each check, in order (repeated for checks of one label).
        passed: Per check: passed (host memory; filled when ``event`` completes).
        event: The device event after the copy (None on the CPU: ready at once).
        undo: Host bookkeeping to undo if the step failed.
    """

    step: int
    labels: list[str]
    passed: Tensor
    event: torch.Event | None
    undo: list[Callable[[], None]]

    def ready(self) -> bool:
        """Whether the results have reached the host (never waits)."""
        return self.event is None or self.event.query()

    def failed(self) -> list[str]:
        """The labels with inf/NaN, each once, in order (waits for the copy if needed)."""
        if self.event is not None:
            self.event.synchronize()
        failed = [
            label for label, ok in zip(self.labels, self.passed.tolist(), strict=True) if not ok
        ]
        return list(dict.fromkeys(failed))


class VerdictQueue:
    """The verdicts of the steps not read yet, read in order (module docstring).

    Args:
        describe: Turns a failed verdict into the warning's text.
    """

    def __init__(self, describe: Callable[[Verdict, list[str]], str]) -> None:
        self._pending: list[Verdict] = []
        self._describe = describe
        self.skipped: list[tuple[int, list[str]]] = []  # (step, labels) of every failed step

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, verdict: Verdict) -> None:
        """Queue a verdict (its step has been committed on the device)."""
        self._pending.append(verdict)

    def poll(self, block: bool = False) -> list[Verdict]:
        """Read the verdicts that are ready (all of them if ``block``), in order.

        For each failed one: warn (naming the step and the labels) and run its undo
        callbacks, latest step first. Returns the failed verdicts.
        """
        failed: list[tuple[Verdict, list[str]]] = []
        while self._pending and (block or self._pending[0].ready()):
            verdict = self._pending.pop(0)
            labels = verdict.failed()
            if labels:
                failed.append((verdict, labels))
        for verdict, _ in reversed(failed):
            for undo in reversed(verdict.undo):
                undo()
        for verdict, labels in failed:
            self.skipped.append((verdict.step, labels))
            warnings.warn(self._describe(verdict, labels), stacklevel=_caller_stacklevel())
        return [verdict for verdict, _ in failed]

    def clear(self) -> None:
        """Forget every pending verdict (after loading a checkpoint)."""
        self._pending.clear()
