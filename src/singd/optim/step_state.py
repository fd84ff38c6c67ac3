"""Host-side bookkeeping of the steps: verdicts, skipped steps, due layers, ``meta`` models.

:class:`StepStateMixin` is the part of
:class:`~singd.optim.base.KroneckerOptimizer` that reads what the device decided
(the step guard's verdicts, :mod:`singd.optim.guard`) and corrects the host's view of
it: a skipped step is taken off the step counter and the gradient scales; the layers
due for a refresh are checked for statistics (and demoted to the fallback if their
forward hook never runs); a model built on the ``meta`` device is followed onto the
parameters ``to_empty()`` made.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from singd.optim.verdicts import Verdict, VerdictQueue

if TYPE_CHECKING:
    from torch import nn

    from singd.amp import GradScaleTracker
    from singd.capture import StatisticsCapture
    from singd.layers import Layer
    from singd.optim.layer_registry import LayerRegistry
    from singd.preconditioners import LayerPreconditioner


class StepStateMixin:
    """Verdicts, the step counter, due layers and deferred parameters (module docstring)."""

    steps: int
    model: nn.Module
    param_groups: list[dict[str, Any]]
    state: Any
    _preconditioners: dict[str, LayerPreconditioner]
    _registry: LayerRegistry
    _scales: GradScaleTracker
    _verdicts: VerdictQueue
    _capture: StatisticsCapture
    _deferred: bool
    if TYPE_CHECKING:  # (KroneckerOptimizer and LayerGroupsMixin provide them)

        def due_layers(self) -> list[Layer]: ...

        def group_of(self, layer_name: str) -> dict[str, Any]: ...

        def _demote(self, name: str, reason: str) -> None: ...

    def _follow_materialised_parameters(self) -> bool:
        """Built on a ``meta`` model: use the parameters ``model.to_empty()`` created.

        Returns:
            Whether statistics from passes on ``meta`` were dropped.

        Raises:
            RuntimeError: If the model is still on the ``meta`` device.
        """
        dropped = False
        for pre in self._preconditioners.values():  # (passes on meta left no data)
            if pre.has_statistics() and any(t.is_meta for t in pre.statistics()[0]):
                pre.drop_statistics()
                dropped = True
            if any(t.is_meta for t in pre.state_dict().values()):
                pre.load_state_dict({})  # (allocated again on the parameters' device)
        current = dict(self.model.named_parameters())
        still_meta = [name for name, p in current.items() if p.is_meta]
        if still_meta:
            raise RuntimeError(
                f"The model's parameters are on the meta device (no data): {', '.join(still_meta)}."
                " Materialise them before training (model.to_empty(device=...), then "
                "initialise them); the optimizer follows the new parameters."
            )
        for group in self.param_groups:
            for i, old in enumerate(group["params"]):
                name = self._registry.param_names.get(old)
                new = current.get(name) if name is not None else None
                if new is None or new is old:
                    continue
                group["params"][i] = new
                self._registry.replace(old, new)
                if old in self.state:
                    self.state[new] = self.state.pop(old)
        self._deferred = False
        return dropped

    def _guard_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _read_verdicts(
        self, just_ran: tuple[int, dict[int, float]] | None = None, block: bool = False
    ) -> bool:
        """Read the verdicts of earlier steps that are ready; undo the skipped ones.

        Each skipped step is taken off ``steps``. Gradient scales (keyed by step):

        * ``just_ran`` = (t, scales before it): read right after step t, before the next
          backward pass. If step t itself was skipped, the scales are as before it
          (without :math:`s_t`: the retry observes its own scale).
        * otherwise the skipped steps are taken out of the numbering: the backward
          pass of the coming step (which may have run) divided by the scale of the
          last step that ran, which stays the previous scale of the coming step.

        Returns:
            Whether a step was found skipped.
        """
        failed = [v.step for v in self._verdicts.poll(block=block)]
        if not failed:
            return False
        provisional = self.steps
        self.steps -= len(failed)
        if just_ran is not None and just_ran[0] in failed:
            t, scales_before = just_ran
            self._scales.scales = {k: v for k, v in scales_before.items() if k != t}
            if len(failed) > 1:  # (earlier ones, found late on an accelerator)
                self._scales.rebase(t, t - (len(failed) - 1))
        else:
            self._scales.rebase(provisional, self.steps)
        return True

    @staticmethod
    def _describe_skip(verdict: Verdict, labels: list[str]) -> str:
        return (
            f"Step {verdict.step} skipped: inf/NaN in {', '.join(labels)}. Parameters, "
            "momenta, factors and the step counter are as they were; the next step is "
            f"step {verdict.step} again."
        )

    def wait_for_verdicts(self) -> list[tuple[int, list[str]]]:
        """Wait until every step's inf/NaN verdict has reached the host; return the
        (step, labels) of every step skipped so far.

        On the CPU verdicts are read at the end of each ``step()``; on an accelerator
        at the start of a later ``step()`` once the device has finished (checked
        without waiting), so ``steps`` may count a skipped step until then. This
        method, ``state_dict()`` and ``load_state_dict()`` wait for them.
        """
        self._read_verdicts(block=True)
        return list(self._verdicts.skipped)

    def _check_statistics(self, relaxed: bool = False) -> list[Layer]:
        """The layers due for a refresh, after demoting those whose hooks never fire.

        A due layer with a weight gradient but no statistics is

        * demoted to the fallback (with a warning) if its forward hook has never run:
          its weight is used without calling the module (``nn.MultiheadAttention``'s
          ``out_proj``), so it can never get statistics;
        * otherwise merely unused in this step (a multi-task head; ``zero_grad
          (set_to_none=False)`` leaves it a zero gradient): it keeps its factors and
          is refreshed at its next refresh step with statistics.

        Raises:
            RuntimeError: If no due layer has statistics (no backward pass ran since the
                last step), unless ``relaxed`` (the schedule was just corrected for a
                skipped step, after this backward pass was captured).
        """
        due = self.due_layers()
        missing = [layer for layer in due if not self._preconditioners[layer.name].has_statistics()]
        if missing and len(missing) == len(due) and not relaxed:
            raise RuntimeError(
                f"step() was called at a refresh step (step {self.steps}) but no backward pass "
                "ran through the model's layers since the last step, so there are no curvature "
                "statistics. Call zero_grad(), then forward and backward, then step()."
            )
        for layer in missing:
            if layer.name in self._capture.fired:
                continue  # unused in this step: its factors stay as they are
            reason = (
                "its weight has a gradient but its forward hook never fired (the weight is "
                "used without calling the module, e.g. nn.MultiheadAttention.out_proj)"
            )
            warnings.warn(
                f"Layer {layer.name!r} ({type(layer.module).__name__}): {reason}; its parameters "
                f"move to the fallback rule ({self.group_of(layer.name)['fallback']}).",
                stacklevel=4,
            )
            self._demote(layer.name, reason)
        return [layer for layer in due if layer.name in self._preconditioners]
