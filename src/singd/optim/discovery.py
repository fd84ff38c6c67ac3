"""Which parameters of a model get Kronecker factors, and why the others do not.

:func:`discover_layers` maps each parameter to the supported layer it belongs to (a
module with a registered adapter, :mod:`singd.layers`) or gives the reason it has
none: no adapter, a tied weight, a parametrized (computed) weight, or a reason the
optimizer gives (``unsupported_reason``). :class:`~singd.optim.layer_registry.LayerRegistry`
keeps what an optimizer made of it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from singd.layers import Layer, find_adapter


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
    reasons: dict[nn.Parameter, str] = {}
    for name, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is None:
            continue
        adapter.check()
        layer = Layer(name, adapter)
        computed = computed_weight_reason(layer)
        if computed is not None:
            for p in module.parameters():  # the parametrization's tensors and the bias
                reasons.setdefault(p, computed)
            continue
        for p in layer.params:
            owners.setdefault(p, []).append(layer)
    layer_of_param: dict[nn.Parameter, Layer] = {}
    excluded: dict[str, str] = {}
    for layers in owners.values():
        if len(layers) > 1:
            reason = "shared by layers " + ", ".join(repr(layer.name) for layer in layers)
            for layer in layers:
                excluded[layer.name] = reason
    for p, layers in owners.items():
        layer = layers[0]
        why = excluded.get(layer.name) or unsupported_reason(layer)
        if why is None:
            layer_of_param[p] = layer
        else:
            reasons[p] = why
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p not in owners:
                reasons.setdefault(p, f"{type(module).__name__} has no Kronecker adapter")
    return layer_of_param, reasons


def computed_weight_reason(layer: Layer) -> str | None:
    """Why a layer whose weight (or bias) is computed, not a Parameter, gets no factors.

    ``parametrizations.weight_norm`` / ``spectral_norm`` and
    ``parametrize.register_parametrization`` (and the older hook-based
    ``nn.utils.weight_norm`` / ``spectral_norm``) make ``module.weight`` a function of
    other tensors (``original0``, ``weight_g``, …). Kronecker factors precondition the
    gradient of the weight matrix itself; the tensors that are trained are not that
    matrix, and their natural gradient is not the layer's, so the layer's parameters
    get the fallback rule instead of a wrong preconditioner.
    """
    weight, bias = layer.adapter.parameters()
    if isinstance(weight, nn.Parameter) and (bias is None or isinstance(bias, nn.Parameter)):
        return None
    trained = ", ".join(n for n, _ in layer.module.named_parameters()) or "none"
    return (
        f"{type(layer.module).__name__} {layer.name!r} has a parametrized weight (weight_norm, "
        "spectral_norm or register_parametrization): Kronecker factors precondition a "
        f"weight matrix, but it trains other tensors ({trained})"
    )
