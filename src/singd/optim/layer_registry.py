"""The layers of an optimizer's param groups, its fallback parameters, and why.

:func:`~singd.optim.discovery.discover_layers` maps each parameter to its supported
layer or to the reason it has none. A :class:`LayerRegistry` keeps what an optimizer
made of that: the layers of each param group, the parameters trained by the fallback
rule, the layers demoted to the fallback after construction (rendered as a table by
:mod:`singd.optim.report`, ``print(optimizer)``). :class:`LayerGroupsMixin` is the
optimizer side: param groups, their validated configurations and their layers'
preconditioners.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from singd.config import GroupConfig, LayerPlan
from singd.layers import Layer, supported_layer_types
from singd.optim.discovery import computed_weight_reason, discover_layers
from singd.optim.groups import GroupConfigs
from singd.optim.report import RegistrationReportMixin
from singd.optim.validation import BOUNDS, Bound, validate_common_group

if TYPE_CHECKING:
    from singd.capture import StatisticsCapture
    from singd.distributed import Distributor
    from singd.preconditioners import LayerPreconditioner

#: ``Layer`` lives in :mod:`singd.layers`; importable from here for older code.
__all__ = [
    "Layer",
    "LayerGroupsMixin",
    "LayerRegistry",
    "computed_weight_reason",
    "discover_layers",
]


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


class LayerGroupsMixin(RegistrationReportMixin):
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
