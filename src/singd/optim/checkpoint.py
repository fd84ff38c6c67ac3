"""Checkpoints of the Kronecker optimizers: tensors and plain values only.

A state dict is torch.optim's (param groups, per-parameter state: momentum
buffers and the fallback's moments) with every group converted to plain values
(:meth:`CheckpointMixin._plain_group`: structures and dtypes by name, a callable
``lr_cov`` dropped), plus one optimizer-specific section (``_STATE_KEY``) that
holds the step count, the gradient scales, every layer's preconditioner state
keyed by module name, and the layers that were moved to the fallback. So it
loads with ``torch.load(weights_only=True)``, into an optimizer built for the
same model (another process, another number of ranks).
"""

from __future__ import annotations

import copy
import warnings
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from singd.optim.state_checks import check_layer_state, check_parameter_states
from singd.optim.validation import BOUNDS

if TYPE_CHECKING:
    from singd.amp import GradScaleTracker
    from singd.distributed import Distributor
    from singd.optim.layer_registry import LayerRegistry
    from singd.preconditioners import LayerPreconditioner


class CheckpointMixin(Optimizer):
    """``state_dict`` / ``load_state_dict`` of :class:`~singd.optim.base.KroneckerOptimizer`."""

    #: Name of the optimizer-specific section of the state dict.
    _STATE_KEY = "kronecker"

    steps: int
    _scales: GradScaleTracker
    _distributor: Distributor
    _preconditioners: dict[str, LayerPreconditioner]

    _registry: LayerRegistry

    @abstractmethod
    def _demote(self, name: str, reason: str) -> None:
        """Move a layer to the fallback rule (the skeleton implements it)."""

    @abstractmethod
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check and normalise a param group (the layer registry implements it)."""

    @abstractmethod
    def _parse_group(self, index: int) -> None:
        """Validate param group ``index`` into its configuration (the skeleton does)."""

    def _plain_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """A param group with only plain values (subclasses convert their own types).

        A callable ``lr_cov`` is code, so it is not saved: the optimizer that loads
        the checkpoint keeps its own schedule.
        """
        plain = dict(group)
        if callable(group["lr_cov"]):
            plain["lr_cov"] = None
        return plain

    def _restore_group(self, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`_plain_group`, given the current group."""
        restored = dict(saved)
        if restored.get("lr_cov") is None:
            restored["lr_cov"] = current["lr_cov"]
        return restored

    if TYPE_CHECKING:  # (StepStateMixin: the verdicts of guarded steps, waited for)

        def wait_for_verdicts(self) -> list[tuple[int, list[str]]]: ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python values only; layers are keyed by module name.

        Waits for the inf/NaN verdicts of the steps so far (on an accelerator), so the
        saved step counter counts only the steps that were applied. With
        ``distributed="sharded"`` this is a collective (call it on every rank): it
        gathers every layer's factors from their owners, so that the state dict of
        rank 0 restores every rank.
        """
        self.wait_for_verdicts()
        state = super().state_dict()
        state["param_groups"] = [self._plain_group(g) for g in state["param_groups"]]
        layers = {name: pre.state_dict() for name, pre in self._preconditioners.items()}
        state[self._STATE_KEY] = {
            "steps": self.steps,
            "grad_scales": dict(self._scales.scales),
            "layers": self._distributor.gather_layer_states(self, layers),  # type: ignore[arg-type]
            "fallback_layers": dict(self._registry.demoted),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also one loaded with ``weights_only=True``).

        Everything is checked before anything changes (:meth:`_check_state_dict`):
        a refused checkpoint leaves the optimizer as it was.

        Raises:
            ValueError: If it was saved by another optimizer type, for other layers or
                parameters, or holds invalid hyper-parameters, tensors of the wrong
                shape or inf/NaN; the message names the group, parameter or layer, the
                tensor, and what was expected and found.
        """
        self.wait_for_verdicts()
        own, rest = self._check_state_dict(state_dict)
        for name, reason in own.get("fallback_layers", {}).items():
            if name in self._preconditioners:
                self._demote(name, reason)
        snapshot = (
            [dict(g) for g in self.param_groups],
            self.state,
            self.steps,
            dict(self._scales.scales),
            {name: pre.state_dict() for name, pre in self._preconditioners.items()},
        )
        try:
            super().load_state_dict(rest)
            for index in range(len(self.param_groups)):
                self._parse_group(index)
            self.steps = int(own["steps"])
            self._scales.scales = {int(k): float(v) for k, v in own["grad_scales"].items()}
            for name, pre in self._preconditioners.items():
                if self._distributor.owns(name):  # sharded: each rank keeps only its layers
                    pre.load_state_dict(own["layers"][name])
        except BaseException:  # (not expected after the checks: put everything back)
            groups, self.state, self.steps, self._scales.scales, layers = snapshot
            for group, saved in zip(self.param_groups, groups, strict=True):
                group.clear()
                group.update(saved)
            for index in range(len(self.param_groups)):
                self._parse_group(index)
            for name, pre in self._preconditioners.items():
                pre.load_state_dict(layers.get(name, {}))
            raise

    def _check_state_dict(self, state_dict: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check a whole checkpoint; return its own section and the torch part (with the
        groups restored). Changes nothing.

        Raises:
            ValueError: As :meth:`load_state_dict` says.
        """
        kind = type(self).__name__
        if not isinstance(state_dict, Mapping) or self._STATE_KEY not in state_dict:
            raise ValueError(
                f"This state dict was not saved by {kind} (no {self._STATE_KEY!r} entry)."
            )
        own = state_dict[self._STATE_KEY]
        if not isinstance(own, Mapping):
            raise ValueError(f"{self._STATE_KEY!r}: expected a dict, found {type(own).__name__}.")
        for key, expected in (("steps", int), ("grad_scales", Mapping), ("layers", Mapping)):
            value = own.get(key)
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ValueError(
                    f"{self._STATE_KEY!r}: {key!r} must be a {getattr(expected, '__name__', '')}"
                    f", found {value!r}."
                )
        if own["steps"] < 0:
            raise ValueError(f"{self._STATE_KEY!r}: 'steps' must be ≥ 0, found {own['steps']}.")
        for step, scale in own["grad_scales"].items():
            try:
                BOUNDS["init_grad_scale"].check(scale, where=f"(grad scale of step {step})")
                int(step)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{self._STATE_KEY!r}: {error}") from None
        fallback_layers = own.get("fallback_layers", {})
        if not isinstance(fallback_layers, Mapping) or not all(
            isinstance(reason, str) for reason in fallback_layers.values()
        ):
            raise ValueError(
                f"{self._STATE_KEY!r}: 'fallback_layers' must map layer names to reasons."
            )
        rest = {k: v for k, v in state_dict.items() if k != self._STATE_KEY}
        groups = rest.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            found = len(groups) if isinstance(groups, list) else repr(groups)
            raise ValueError(
                f"The checkpoint has {found} param groups, this optimizer {len(self.param_groups)}."
            )
        restored = []
        for index, (saved, current) in enumerate(zip(groups, self.param_groups, strict=True)):
            try:
                if not isinstance(saved, Mapping):
                    raise ValueError(f"expected a dict, found {type(saved).__name__}")
                group = self._restore_group(dict(saved), current)
                if len(group.get("params", ())) != len(current["params"]):
                    raise ValueError(
                        f"it has {len(group.get('params', ()))} parameters, this optimizer's "
                        f"group {len(current['params'])}"
                    )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (warnings come again when it is loaded)
                    self._validate_group(copy.copy(group))
            except (TypeError, ValueError, KeyError) as error:
                raise ValueError(f"Param group {index} of the checkpoint: {error}") from None
            restored.append(group)
        layers = set(self._preconditioners) - set(fallback_layers)
        if set(own["layers"]) != layers:
            missing = sorted(layers - set(own["layers"]))
            extra = sorted(set(own["layers"]) - layers)
            raise ValueError(
                f"The checkpoint holds the layers {sorted(own['layers'])}, this optimizer "
                f"{sorted(layers)}"
                + (f"; missing: {missing}" if missing else "")
                + (f"; not in this optimizer: {extra}" if extra else "")
                + ". Was it saved for another model?"
            )
        for name in layers:
            shapes, optional = self._preconditioners[name].expected_state()
            check_layer_state(name, own["layers"][name], shapes, optional)
        rest["param_groups"] = restored
        params = [p for group in self.param_groups for p in group["params"]]
        names = [self._registry.param_names.get(p, f"#{i}") for i, p in enumerate(params)]
        check_parameter_states(rest, params, names)
        return dict(own), rest
