"""Which parameters of a model get Kronecker factors, which the fallback, and why.

:func:`discover_layers` maps each parameter to the supported layer it belongs to (a
module with a registered adapter, :mod:`singd.layers`) or gives the reason it has
none; :func:`registration_report` renders what an optimizer made of it
(``print(optimizer)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from singd.layers import LayerAdapter, find_adapter

if TYPE_CHECKING:
    from singd.optim.base import KroneckerOptimizer


@dataclasses.dataclass(frozen=True)
class Layer:
    """A supported layer: its name in the model, the module and its adapter."""

    name: str
    module: nn.Module
    adapter: LayerAdapter

    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter."""
        return self.adapter.parameters(self.module)[0]

    @property
    def params(self) -> list[nn.Parameter]:
        """Weight and bias (if any), in the order of :meth:`LayerAdapter.split_matrix`."""
        return [p for p in self.adapter.parameters(self.module) if p is not None]

    def trainable_params(self) -> list[nn.Parameter]:
        """The parameters of :attr:`params` that require gradients."""
        return [p for p in self.params if p.requires_grad]


def discover_layers(
    model: nn.Module, unsupported_reason: Callable[[Layer], str | None]
) -> tuple[dict[nn.Parameter, Layer], dict[nn.Parameter, str]]:
    """Map parameters to supported layers; give every other parameter a reason.

    A parameter shared by several layers (tied weights) excludes all of them: one
    pair of Kronecker factors cannot serve two different layers.

    Args:
        model: The model.
        unsupported_reason: Why an optimizer cannot precondition a layer it has an
            adapter for (None if it can).

    Returns:
        ``(layer_of_param, reasons)``: the Kronecker layer of each of its
        parameters, and why every other parameter gets none.
    """
    owners: dict[nn.Parameter, list[Layer]] = {}
    for name, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is None:
            continue
        adapter.check(module)
        layer = Layer(name, module, adapter)
        for p in layer.params:
            owners.setdefault(p, []).append(layer)
    layer_of_param: dict[nn.Parameter, Layer] = {}
    reasons: dict[nn.Parameter, str] = {}
    excluded: dict[str, str] = {}
    for layers in owners.values():
        if len(layers) > 1:
            reason = "shared by layers " + ", ".join(repr(layer.name) for layer in layers)
            for layer in layers:
                excluded[layer.name] = reason
    for p, layers in owners.items():
        layer = layers[0]
        reason = excluded.get(layer.name) or unsupported_reason(layer)
        if reason is None:
            layer_of_param[p] = layer
        else:
            reasons[p] = reason
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p not in owners:
                reasons.setdefault(p, f"{type(module).__name__} has no Kronecker adapter")
    return layer_of_param, reasons


def registration_report(optimizer: KroneckerOptimizer) -> str:
    """A table of how every trainable parameter of the model is handled.

    One row per Kronecker layer (type, parameters, factor structures and
    dimensions, bytes of optimizer state: factors, momenta and momentum buffers),
    then one row per fallback parameter with its rule, the reason it gets no
    Kronecker factors, and its state bytes; the total comes last. Factors are
    allocated at the first step: before that their bytes are what they will take.
    """
    rows = [("layer", "type", "parameters", "preconditioner", "state bytes")]
    total = 0
    for name, layer in optimizer._layers.items():
        factors, nbytes = optimizer._describe_layer(layer)
        nbytes += optimizer._state_bytes(layer.params)
        total += nbytes
        params = ", ".join(
            n.rsplit(".", 1)[-1] for n in (optimizer._param_names[p] for p in layer.params)
        )
        rows.append((name or "<model>", type(layer.module).__name__, params, factors, nbytes))
    for p, index in optimizer._fallback_group.items():
        rule = optimizer.param_groups[index]["fallback"]
        nbytes = optimizer._state_bytes([p])
        total += nbytes
        reason = optimizer._fallback_reasons.get(p, "")
        rows.append((optimizer._param_names.get(p, "?"), "fallback", rule, reason, nbytes))
    untrained = [
        name
        for p, name in optimizer._param_names.items()
        if p.requires_grad
        and p not in optimizer._fallback_group
        and p not in optimizer._layer_of_param
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
