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

from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

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

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python values only; layers are keyed by module name.

        With ``distributed="sharded"`` this is a collective (call it on every rank):
        it gathers every layer's factors from their owners, so that the state dict of
        rank 0 restores every rank.
        """
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

        Raises:
            ValueError: If it was saved by another optimizer type or for other layers.
        """
        if self._STATE_KEY not in state_dict:
            raise ValueError(
                f"This state dict was not saved by {type(self).__name__} "
                f"(no {self._STATE_KEY!r} entry)."
            )
        own = state_dict[self._STATE_KEY]
        for name, reason in own.get("fallback_layers", {}).items():
            if name in self._preconditioners:
                self._demote(name, reason)
        if set(own["layers"]) != set(self._preconditioners):
            raise ValueError(
                f"The checkpoint holds layers {sorted(own['layers'])}, this optimizer has "
                f"{sorted(self._preconditioners)}."
            )
        rest = {k: v for k, v in state_dict.items() if k != self._STATE_KEY}
        if len(rest["param_groups"]) != len(self.param_groups):
            raise ValueError("The checkpoint has a different number of param groups.")
        rest["param_groups"] = [
            self._restore_group(dict(saved), current)
            for saved, current in zip(rest["param_groups"], self.param_groups, strict=True)
        ]
        super().load_state_dict(rest)
        for index in range(len(self.param_groups)):
            self._parse_group(index)
        self.steps = int(own["steps"])
        self._scales.scales = {int(k): float(v) for k, v in own["grad_scales"].items()}
        for name, pre in self._preconditioners.items():
            if self._distributor.owns(name):  # sharded: each rank keeps only its layers
                pre.load_state_dict(own["layers"][name])
