"""Which parameters of a model get Kronecker factors, which the fallback, and why.

:func:`discover_layers` maps each parameter to the supported layer it belongs to (a
module with a registered adapter, :mod:`singd.layers`) or gives the reason it has
none. A :class:`LayerRegistry` keeps what an optimizer made of that: the layers of
each param group, the parameters trained by the fallback rule, the layers demoted
to the fallback after construction, and renders it as a table (``print(optimizer)``).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.optim import Optimizer

from singd.config import GroupConfig, LayerPlan
from singd.layers import Layer, find_adapter, supported_layer_types
from singd.optim.groups import GroupConfigs
from singd.optim.validation import BOUNDS, Bound, validate_common_group

if TYPE_CHECKING:
    from singd.capture import StatisticsCapture
    from singd.distributed import Distributor
    from singd.preconditioners import LayerPreconditioner


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


class LayerRegistry:
    """The layers of an optimizer's param groups, its fallback parameters, and why.

    Args:
        model: The (unwrapped) model.
        unsupported_reason: As for :func:`discover_layers`.
    """

    def __init__(self, model: nn.Module, unsupported_reason: Callable[[Layer], str | None]) -> None:
        self.param_names = {p: name for name, p in model.named_parameters()}
        self.layer_of_param, self.fallback_reasons = discover_layers(model, unsupported_reason)
        self.layers: dict[str, Layer] = {}
        self.group_of_layer: dict[str, int] = {}
        self.fallback_group: dict[nn.Parameter, int] = {}
        self.demoted: dict[str, str] = {}  # layers moved to the fallback after construction

    def rediscover(
        self, model: nn.Module, unsupported_reason: Callable[[Layer], str | None]
    ) -> None:
        """Learn the parameters and layers added to ``model`` since (known ones keep
        their entries: a demoted layer stays demoted)."""
        layer_of_param, reasons = discover_layers(model, unsupported_reason)
        for name, p in model.named_parameters():
            if p in self.param_names:
                continue
            self.param_names[p] = name
            if p in layer_of_param:
                self.layer_of_param[p] = layer_of_param[p]
            else:
                self.fallback_reasons[p] = reasons.get(p, "no Kronecker adapter")

    def replace(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """``new`` stands for ``old`` from now on (a parameter re-created by
        ``model.to_empty()`` after initialisation on the ``meta`` device)."""
        tables: tuple[dict[nn.Parameter, Any], ...] = (
            self.param_names,
            self.layer_of_param,
            self.fallback_reasons,
        )
        for table in tables:
            if old in table:
                table[new] = table.pop(old)
        if old in self.fallback_group:
            self.fallback_group[new] = self.fallback_group.pop(old)

    def untrained(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters of ``params`` that have no Kronecker layer."""
        return [p for p in params if p not in self.layer_of_param]

    def describe_params(self, params: Iterable[nn.Parameter]) -> str:
        """``name (reason)`` for each parameter, for warnings."""
        return "; ".join(f"{self.param_names[p]} ({self.fallback_reasons[p]})" for p in params)

    def register_group(
        self, params: list[nn.Parameter], index: int, fallback: str | None
    ) -> list[Layer]:
        """Check a new param group's parameters; return its new layers (not yet added).

        Raises:
            ValueError: For parameters without a layer when there is no fallback (or
                not of the model), a layer in another group, or a split layer.
        """
        in_group = {id(p) for p in params}
        new_layers: list[Layer] = []
        fallback_params: list[nn.Parameter] = []
        for p in params:
            layer = self.layer_of_param.get(p)
            if layer is None:
                name = self.param_names.get(p, "<not in the model>")
                reason = self.fallback_reasons.get(p, "not a parameter of the model")
                if fallback is None or p not in self.param_names:
                    raise ValueError(
                        f"Parameter {name!r} cannot get Kronecker factors ({reason}). Supported "
                        f"layers: {', '.join(supported_layer_types())}. Use fallback='adamw' or "
                        "'sgd' to train it with a first-order rule in this optimizer."
                    )
                fallback_params.append(p)
                continue
            if layer.name in self.group_of_layer and self.group_of_layer[layer.name] != index:
                raise ValueError(f"Layer {layer.name!r} already belongs to another param group.")
            missing = [q for q in layer.trainable_params() if id(q) not in in_group]
            if missing:
                raise ValueError(
                    f"The weight and bias of layer {layer.name!r} must be in the same param group."
                )
            if layer.name not in self.group_of_layer and layer not in new_layers:
                new_layers.append(layer)
        for p in fallback_params:
            self.fallback_group[p] = index
        return new_layers

    def add(self, layer: Layer, index: int) -> None:
        """Make ``layer`` a Kronecker layer of param group ``index``."""
        self.layers[layer.name] = layer
        self.group_of_layer[layer.name] = index

    def demote(self, name: str, reason: str) -> Layer:
        """Move a layer's parameters to its group's fallback rule; return the layer."""
        index = self.group_of_layer.pop(name)
        layer = self.layers.pop(name)
        self.demoted[name] = reason
        for p in layer.params:
            self.layer_of_param.pop(p, None)
            self.fallback_reasons[p] = reason
            if p.requires_grad:
                self.fallback_group[p] = index
        return layer

    def report(
        self,
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
            describe_layer: (text, bytes) of a layer's preconditioner, by name.
            state_bytes: Bytes of the ``optimizer.state`` of some parameters.
            param_groups: The optimizer's param groups (for the fallback rules).
        """
        rows: list[tuple[str, str, str, str, int | str]] = [
            ("layer", "type", "parameters", "preconditioner", "state bytes")
        ]
        total = 0
        untrained: list[str] = []
        for name, layer in self.layers.items():
            factors, nbytes = describe_layer(name)
            nbytes += state_bytes(layer.params)
            total += nbytes
            rule = param_groups[self.group_of_layer[name]]["fallback"]
            cells = []
            for p in layer.params:
                short = self.param_names[p].rsplit(".", 1)[-1]
                if not p.requires_grad:
                    cells.append(f"{short} (frozen)")
                elif not layer.weight.requires_grad:  # a bias of a frozen weight
                    cells.append(f"{short} ({rule} while the weight is frozen)")
                    if rule is None:
                        untrained.append(self.param_names[p])
                else:
                    cells.append(short)
            params = ", ".join(cells)
            rows.append((name or "<model>", type(layer.module).__name__, params, factors, nbytes))
        for p, index in self.fallback_group.items():
            rule = param_groups[index]["fallback"]
            nbytes = state_bytes([p])
            total += nbytes
            reason = self.fallback_reasons.get(p, "")
            rule_text = f"{rule}" if p.requires_grad else f"{rule} (frozen)"
            rows.append((self.param_names.get(p, "?"), "fallback", rule_text, reason, nbytes))
        in_layers = {p for layer in self.layers.values() for p in layer.params}
        untrained += [
            name
            for p, name in self.param_names.items()
            if p.requires_grad and p not in self.fallback_group and p not in in_layers
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


class LayerGroupsMixin(Optimizer):
    """Param groups, their layers and configurations, for
    :class:`~singd.optim.base.KroneckerOptimizer`.

    Subclasses give :attr:`config_cls`, :attr:`preconditioner_cls`, :meth:`_plan`
    and may extend :meth:`_validate_group` and :meth:`_unsupported_reason`.
    """

    #: The configuration of a param group (validated once, :mod:`singd.config`).
    config_cls: type[GroupConfig] = GroupConfig
    #: The per-layer preconditioner (:mod:`singd.preconditioners`).
    preconditioner_cls: type[LayerPreconditioner]
    #: The hyper-parameter bounds (:mod:`singd.optim.validation`).
    _BOUNDS: Mapping[str, Bound] = BOUNDS

    _registry: LayerRegistry
    _preconditioners: dict[str, LayerPreconditioner]
    _groups: GroupConfigs[GroupConfig]
    _capture: StatisticsCapture
    _distributor: Distributor

    def _unsupported_reason(self, layer: Layer) -> str | None:
        """Why this optimizer cannot precondition ``layer`` (None if it can)."""
        return None

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check and normalise a param group's hyper-parameters (subclasses extend)."""
        validate_common_group(group, self._BOUNDS)

    @abstractmethod
    def _plan(self, layer: Layer, config: Any) -> LayerPlan:
        """The plan of ``layer``'s preconditioner under its group's ``config``."""

    def _make_preconditioner(self, layer: Layer, config: GroupConfig) -> LayerPreconditioner:
        return self.preconditioner_cls(
            layer,
            self._plan(layer, config),
            config,
            factor_free_statistics=not self._distributor.replicates_factors,
        )

    @property
    def _layers(self) -> dict[str, Layer]:
        return self._registry.layers

    @property
    def _param_names(self) -> dict[nn.Parameter, str]:
        return self._registry.param_names

    @property
    def preconditioners(self) -> Mapping[str, LayerPreconditioner]:
        """Every layer's preconditioner, by module name."""
        return self._preconditioners

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters must be the weights/biases of supported layers.

        New layers get fresh preconditioner state; a layer's weight and bias must be
        in the same group.

        Raises:
            ValueError: For parameters of unsupported layers, split layers, or
                invalid hyper-parameters.
        """
        params = param_group.get("params", [])
        params = [params] if isinstance(params, Tensor) else list(params)
        if any(p not in self._registry.param_names for p in params):
            model = getattr(self, "model", None)  # (layers added to the model since)
            if model is not None:
                self._registry.rediscover(model, self._unsupported_reason)
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._parse_group(index)
            group = self.param_groups[index]
            layers = self._registry.register_group(group["params"], index, group["fallback"])
        except Exception:
            self.param_groups.pop()
            self._groups.truncate(index)
            raise
        for layer in layers:
            self._registry.add(layer, index)
            config = self._groups.configs[index]
            self._preconditioners[layer.name] = self._make_preconditioner(layer, config)
            self._capture.add(layer.name, layer.module)

    def _validated_config(self, group: dict[str, Any]) -> GroupConfig:
        self._validate_group(group)
        return self.config_cls.from_group(group)

    def _parse_group(self, index: int) -> None:
        """Validate group ``index`` into its configuration; give its layers new plans."""
        config = self._groups.parse(index, self.param_groups[index])
        for name, pre in self._preconditioners.items():
            if self._registry.group_of_layer[name] == index:
                pre.config, pre.plan = config, self._plan(pre.layer, config)

    def _config(self, index: int) -> GroupConfig:
        """The configuration of group ``index``, re-validated if the group was edited."""
        for edited in self._groups.edited(self.param_groups):
            self._parse_group(edited)
        return self._groups.configs[index]

    def group_of(self, layer_name: str) -> dict[str, Any]:
        """The param group of a layer."""
        return self.param_groups[self._registry.group_of_layer[layer_name]]

    def _layer_config(self, layer_name: str) -> GroupConfig:
        return self._config(self._registry.group_of_layer[layer_name])

    def _demote(self, name: str, reason: str) -> None:
        """Move a layer's parameters to the fallback rule (hooks removed, state dropped)."""
        self._registry.demote(name, reason)
        self._capture.discard(name)
        del self._preconditioners[name]

    # --- registration report -----------------------------------------------------------
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

        See :meth:`LayerRegistry.report`.
        """
        return self._registry.report(
            lambda name: self._preconditioners[name].describe(),
            self._state_bytes,
            self.param_groups,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n{self.describe()}\n)"
