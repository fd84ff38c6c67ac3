"""What an optimizer made of a model's parameters, for people: ``print(optimizer)``.

:func:`registration_table` renders a :class:`~singd.optim.layer_registry.LayerRegistry`
as one row per Kronecker layer and per fallback parameter with its optimizer-state
bytes; :class:`RegistrationReportMixin` gives an optimizer ``describe()``,
``__repr__`` and the one warning when the fallback trains most of the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from singd.config import GroupConfig
    from singd.optim.layer_registry import LayerRegistry
    from singd.preconditioners import LayerPreconditioner


def registration_table(
    registry: LayerRegistry,
    describe_layer: Callable[[str], tuple[str, int]],
    state_bytes: Callable[[Iterable[nn.Parameter]], int],
    param_groups: list[dict[str, Any]],
) -> str:
    """A table of how every trainable parameter of the model is handled.

    One row per Kronecker layer (type, parameters, factor structures and
    dimensions, bytes of optimizer state: factors, momenta and momentum buffers),
    then one row per fallback parameter with its rule, the reason it gets no
    Kronecker factors, and its state bytes; the total comes last. Factors are
    allocated at the first step: before that their bytes are what they will take.

    Args:
        registry: The optimizer's layers and fallback parameters.
        describe_layer: (text, bytes) of a layer's preconditioner, by name.
        state_bytes: Bytes of the ``optimizer.state`` of some parameters.
        param_groups: The optimizer's param groups (for the fallback rules).
    """
    rows: list[tuple[str, str, str, str, int | str]] = [
        ("layer", "type", "parameters", "preconditioner", "state bytes")
    ]
    total = 0
    untrained: list[str] = []
    for name, layer in registry.layers.items():
        factors, nbytes = describe_layer(name)
        nbytes += state_bytes(layer.params)
        total += nbytes
        rule = param_groups[registry.group_of_layer[name]]["fallback"]
        cells = []
        for p in layer.params:
            short = registry.param_names[p].rsplit(".", 1)[-1]
            if not p.requires_grad:
                cells.append(f"{short} (frozen)")
            elif not layer.weight.requires_grad:  # a bias of a frozen weight
                cells.append(f"{short} ({rule} while the weight is frozen)")
                if rule is None:
                    untrained.append(registry.param_names[p])
            else:
                cells.append(short)
        params = ", ".join(cells)
        rows.append((name or "<model>", type(layer.module).__name__, params, factors, nbytes))
    for p, index in registry.fallback_group.items():
        rule = param_groups[index]["fallback"]
        nbytes = state_bytes([p])
        total += nbytes
        reason = registry.fallback_reasons.get(p, "")
        rule_text = f"{rule}" if p.requires_grad else f"{rule} (frozen)"
        rows.append((registry.param_names.get(p, "?"), "fallback", rule_text, reason, nbytes))
    in_layers = {p for layer in registry.layers.values() for p in layer.params}
    untrained += [
        name
        for p, name in registry.param_names.items()
        if p.requires_grad and p not in registry.fallback_group and p not in in_layers
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row[:4], widths, strict=True))
        + f"  {row[4]}"
        for row in rows
    ]
    lines.append(f"total optimizer state: {total} bytes")
    if untrained:
        lines.append(f"not trained by this optimizer: {', '.join(untrained)}")
    return "\n".join(lines)


class RegistrationReportMixin(Optimizer):
    """``describe()``, ``__repr__`` and the coverage warning of a Kronecker optimizer
    (:class:`~singd.optim.layer_registry.LayerGroupsMixin` provides what they read)."""

    _registry: LayerRegistry
    _preconditioners: dict[str, LayerPreconditioner]

    def _config(self, index: int) -> GroupConfig:
        """The configuration of param group ``index`` (the layer-groups mixin's)."""
        raise NotImplementedError

    def _state_bytes(self, params: Iterable[nn.Parameter]) -> int:
        """Bytes of the ``optimizer.state`` of ``params``; for a parameter not updated
        yet, what its first update will allocate (:meth:`_projected_state_bytes`)."""
        total = 0
        for p in params:
            state = self.state.get(p)
            if state:
                total += sum(
                    t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor)
                )
            else:
                total += self._projected_state_bytes(p)
        return total

    def _projected_state_bytes(self, p: nn.Parameter) -> int:
        """The state the first update of ``p`` allocates: a momentum buffer for a
        Kronecker layer's parameter (momentum ≠ 0); for a fallback parameter, AdamW's
        two moments and its float32 step, or SGD's momentum buffer. A rule added with
        ``register_fallback`` allocates what it does: counted once it has run."""
        size = p.numel() * p.element_size()
        layer = self._registry.layer_of_param.get(p)
        if layer is not None and layer.name in self._registry.group_of_layer:
            momentum = self._config(self._registry.group_of_layer[layer.name]).momentum
            return size if p.requires_grad and momentum != 0 else 0
        index = self._registry.fallback_group.get(p)
        if index is None:
            return 0
        rule = self.param_groups[index]["fallback"]
        if rule == "adamw":
            return 2 * size + 4
        if rule == "sgd":
            return size if self._config(index).momentum != 0 else 0
        return 0

    def _warn_if_mostly_fallback(self, stacklevel: int) -> None:
        """One warning when Kronecker factors cover less than half of the trainable
        parameters, naming the biggest modules left to the fallback and why."""
        trainable = [p for p in self._registry.param_names if p.requires_grad]
        total = sum(p.numel() for p in trainable)
        covered = sum(p.numel() for p in trainable if p in self._registry.layer_of_param)
        if total == 0 or 2 * covered >= total:
            return
        by_module: dict[tuple[str, str], int] = {}
        for p in trainable:
            if p in self._registry.fallback_group:
                module = self._registry.param_names[p].rpartition(".")[0] or "<model>"
                key = (module, self._registry.fallback_reasons.get(p, ""))
                by_module[key] = by_module.get(key, 0) + p.numel()
        biggest = sorted(by_module.items(), key=lambda item: -item[1])[:3]
        rules = sorted(
            {str(self.param_groups[i]["fallback"]) for i in self._registry.fallback_group.values()}
        )
        warnings.warn(
            f"{type(self).__name__} gives Kronecker factors to {100 * covered / total:.1f}% of "
            f"the {total:,} trainable parameters; the fallback rule ({', '.join(rules)}) "
            "trains the rest. Largest: "
            + "; ".join(f"{m!r} ({n:,} parameters: {why})" for (m, why), n in biggest)
            + ". A layer type gets factors with singd.register_adapter (docs/layers.md); "
            "warn_unsupported=False silences this.",
            stacklevel=stacklevel,
        )

    def describe(self) -> str:
        """A table of how every trainable parameter of the model is handled.

        See :func:`registration_table`.
        """
        return registration_table(
            self._registry,
            lambda name: self._preconditioners[name].describe(),
            self._state_bytes,
            self.param_groups,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n{self.describe()}\n)"
