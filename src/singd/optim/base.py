"""What every Kronecker-factored optimizer here shares with the others.

:class:`KroneckerOptimizer` is a ``torch.optim.Optimizer`` that

* finds the layers of ``model`` that have a registered adapter
  (:mod:`singd.layers`) and groups their parameters (``param_groups``);
* captures their inputs and output gradients with :mod:`singd.capture` at
  refresh steps (``step % T == 0``) and hands them to the subclass;
* in ``step()`` asks the subclass to refresh and apply its preconditioner, then
  applies weight decay, heavy-ball momentum and the learning rate;
* trains every other trainable parameter with a first-order *fallback* rule
  (AdamW by default, SGD with momentum, or none), inside the same optimizer:
  parameters of unsupported modules, parameters shared by several layers, and
  layers whose hooks never fire (e.g. ``nn.MultiheadAttention.out_proj``, whose
  weight is used without calling the ``Linear``), which are detected at the first
  refresh step and moved to the fallback with one warning;
* follows the GradScaler protocol (:mod:`singd.amp`) and checkpoints to
  tensors and plain values only (loadable with ``torch.load(weights_only=True)``),
  keyed by module names;
* trains data-parallel on ``torch.distributed`` (also inside a DDP wrapper)
  through a strategy object, replicated or sharded (:mod:`singd.distributed`);
* names its phases for ``torch.profiler`` (:data:`PROFILER_LABELS`).

Subclasses (:class:`~singd.optim.optimizer.SINGD`, :class:`~singd.optim.kfac.KFAC`)
implement the preconditioner: ``_accumulate``, ``_refresh``, ``_precondition``,
``_layer_state`` / ``_load_layer_state``, ``_clear_statistics`` and, for data
parallelism (:mod:`singd.distributed`, the ``distributed`` strategy), ``_statistics``
/ ``_drop_statistics``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function
from torch.optim import Optimizer

from singd.amp import GradScaleTracker, autocast_disabled
from singd.capture import StatisticsCapture
from singd.distributed import Distributor, resolve_distributor, unwrap_model
from singd.functional import apply_parameter_step, kl_clip_factor
from singd.functional.first_order import adamw_step
from singd.layers import supported_layer_types
from singd.optim.registration import Layer, discover_layers, registration_report
from singd.optim.validation import (
    BOUNDS,
    FALLBACK_DEFAULTS,
    Bound,
    check_bool,
    check_grad_scaler,
    validate_common_group,
)

#: ``torch.profiler`` ranges around the optimizer's phases (besides torch.optim's own
#: ``Optimizer.step#…`` range): the curvature statistics of each layer, computed in
#: the backward hooks at refresh steps; the factor refresh; the preconditioning of the
#: gradients. ``benchmarks/step_breakdown.py`` times a step by them.
PROFILER_LABELS: dict[str, str] = {
    "statistics": "singd::statistics",
    "refresh": "singd::refresh",
    "precondition": "singd::precondition",
}


class KroneckerOptimizer(Optimizer, ABC):
    """Base class: layer discovery, hooks, the step skeleton and checkpointing."""

    _step_supports_amp_scaling = True  # GradScaler sets grad_scale/found_inf (torch convention)

    #: Name of the optimizer-specific section of the state dict.
    _STATE_KEY = "kronecker"

    #: The hyper-parameter bounds (:mod:`singd.optim.validation`).
    _BOUNDS: Mapping[str, Bound] = BOUNDS

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
        *,
        warn_unsupported: bool = True,
        init_grad_scale: float = 1.0,
        grad_scaler: torch.amp.GradScaler | None = None,
        distributed: str | Distributor | None = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        # Hooks go on the layers inside a DDP wrapper; its gradients arrive averaged.
        model, wrapper = unwrap_model(model)
        self._distributor = resolve_distributor(distributed, wrapper)
        defaults = {**FALLBACK_DEFAULTS, "kl_clip": None, **defaults}
        check_bool("warn_unsupported", warn_unsupported)
        BOUNDS["init_grad_scale"].check(init_grad_scale)
        check_grad_scaler(grad_scaler)
        self.model = model
        self.grad_scaler = grad_scaler
        if grad_scaler is not None and grad_scaler.is_enabled() and init_grad_scale == 1.0:
            init_grad_scale = grad_scaler.get_scale()
        self._param_names = {p: name for name, p in model.named_parameters()}
        self._layer_of_param, self._fallback_reasons = discover_layers(
            model, self._unsupported_reason
        )
        if params is None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            if defaults["fallback"] is None:
                untrained = [p for p in trainable if p not in self._layer_of_param]
                trainable = [p for p in trainable if p in self._layer_of_param]
                if untrained and warn_unsupported:
                    warnings.warn(
                        f"{type(self).__name__}(fallback=None) will not train: "
                        + "; ".join(
                            f"{self._param_names[p]} ({self._fallback_reasons[p]})"
                            for p in untrained
                        )
                        + ". Use fallback='adamw' or 'sgd' to train them in this optimizer.",
                        stacklevel=3,
                    )
            params = trainable
        self._layers: dict[str, Layer] = {}
        self._group_of_layer: dict[str, int] = {}
        self._fallback_group: dict[nn.Parameter, int] = {}
        self._demoted: dict[str, str] = {}  # layers moved to the fallback after construction
        self._capture = StatisticsCapture(self._is_due, self._on_statistics)
        self._scales = GradScaleTracker(init_grad_scale)
        self._warned_non_finite: set[str] = set()
        self.steps = 0
        super().__init__(params, defaults)
        self._distributor.attach(self, wrapper)

    # --- layer discovery -------------------------------------------------------------
    def _unsupported_reason(self, layer: Layer) -> str | None:
        """Why this optimizer cannot precondition ``layer`` (None if it can)."""
        return None

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check and normalise a param group's hyper-parameters (subclasses extend)."""
        validate_common_group(group, self._BOUNDS)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters must be the weights/biases of supported layers.

        New layers get fresh preconditioner state; a layer's weight and bias must be
        in the same group.

        Raises:
            ValueError: For parameters of unsupported layers, split layers, or
                invalid hyper-parameters.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            self._register_group_layers(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    def _register_group_layers(self, group: dict[str, Any], index: int) -> None:
        in_group = {id(p) for p in group["params"]}
        new_layers: list[Layer] = []
        for p in group["params"]:
            layer = self._layer_of_param.get(p)
            if layer is None:
                name = self._param_names.get(p, "<not in the model>")
                reason = self._fallback_reasons.get(p, "not a parameter of the model")
                if group["fallback"] is None or p not in self._param_names:
                    raise ValueError(
                        f"Parameter {name!r} cannot get Kronecker factors ({reason}). Supported "
                        f"layers: {', '.join(supported_layer_types())}. Use fallback='adamw' or "
                        "'sgd' to train it with a first-order rule in this optimizer."
                    )
                self._fallback_group[p] = index
                continue
            if layer.name in self._group_of_layer and self._group_of_layer[layer.name] != index:
                raise ValueError(f"Layer {layer.name!r} already belongs to another param group.")
            missing = [q for q in layer.trainable_params() if id(q) not in in_group]
            if missing:
                raise ValueError(
                    f"The weight and bias of layer {layer.name!r} must be in the same param group."
                )
            if layer.name not in self._group_of_layer and layer not in new_layers:
                new_layers.append(layer)
        for layer in new_layers:
            self._layers[layer.name] = layer
            self._group_of_layer[layer.name] = index
            self._capture.add(layer.name, layer.module)

    def _demote(self, layer: Layer, reason: str) -> None:
        """Move a layer's parameters to the fallback rule (hooks removed, state dropped)."""
        index = self._group_of_layer.pop(layer.name)
        del self._layers[layer.name]
        self._demoted[layer.name] = reason
        self._capture.discard(layer.name)
        self._forget_layer(layer)
        for p in layer.params:
            self._layer_of_param.pop(p, None)
            self._fallback_reasons[p] = reason
            if p.requires_grad:
                self._fallback_group[p] = index

    # --- capture ---------------------------------------------------------------------
    def group_of(self, layer_name: str) -> dict[str, Any]:
        """The param group of a layer."""
        return self.param_groups[self._group_of_layer[layer_name]]

    def _refresh_due(self, group: Mapping[str, Any]) -> bool:
        return self.steps % group["T"] == 0

    def _is_due(self, layer_name: str) -> bool:
        return layer_name in self._layers and self._refresh_due(self.group_of(layer_name))

    def _on_statistics(self, layer_name: str, x: Tensor, grad_output: Tensor) -> None:
        layer = self._layers[layer_name]
        with autocast_disabled(), record_function(PROFILER_LABELS["statistics"]):
            self._accumulate(layer, self.group_of(layer_name), x, grad_output)

    def set_current_grad_scale(self, scale: float) -> None:
        """Tell the optimizer the gradient scale :math:`s_t` of the coming ``step()``."""
        self._scales.set_current(self.steps, scale)

    # --- subclass interface ----------------------------------------------------------
    @abstractmethod
    def _accumulate(self, layer: Layer, group: dict[str, Any], x: Tensor, g: Tensor) -> None:
        """Add one forward/backward pair's statistics to the layer's accumulators."""

    @abstractmethod
    def _has_statistics(self, layer: Layer) -> bool:
        """Whether statistics were accumulated for the layer since the last step."""

    @abstractmethod
    def _forget_layer(self, layer: Layer) -> None:
        """Drop every piece of state of a layer (it moves to the fallback)."""

    @abstractmethod
    def _clear_statistics(self) -> None:
        """Drop every accumulator (skipped steps)."""

    @abstractmethod
    def _statistics(self, layer: Layer) -> tuple[list[Tensor], list[Tensor]]:
        """The live accumulator tensors (input side, output side) of a layer with
        statistics, which :mod:`singd.distributed` reduces in place over ranks."""

    @abstractmethod
    def _drop_statistics(self, layer: Layer) -> None:
        """Drop one layer's accumulators (sharded mode: another rank owns the layer)."""

    @abstractmethod
    def _refresh(
        self, layer: Layer, group: dict[str, Any], h_c_unscale: float
    ) -> tuple[Tensor, Callable[[], None]]:
        """Update the layer's preconditioner from its accumulated statistics.

        Returns:
            A boolean scalar tensor (all new state finite; not synchronised) and a
            function that restores the state from before this refresh.
        """

    @abstractmethod
    def _precondition(self, layer: Layer, G: Tensor) -> Tensor:
        """Apply the preconditioner to the ``[d_o, d_K]`` gradient matrix."""

    @abstractmethod
    def _layer_state(self, layer: Layer) -> dict[str, Tensor]:
        """The layer's preconditioner state as named tensors (for checkpoints)."""

    @abstractmethod
    def _load_layer_state(self, layer: Layer, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`_layer_state` returned."""

    # --- step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Refresh the due preconditioners, then update every parameter.

        Runs with autocast disabled, so factors and updates keep the dtypes the user
        chose. With a GradScaler, a step whose gradients contain inf/NaN is skipped
        and does **not** count: ``steps`` is not incremented, so the refresh schedule
        (every ``T`` steps) is kept and the skipped refresh happens at the retry.

        Args:
            closure: Optional; re-evaluates the model (zero_grad, forward, backward)
                and returns the loss, as for any ``torch.optim`` optimizer.

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: At a refresh step with gradients but no statistics (no
                backward pass since the last step); or if ``scaler.unscale_`` was
                called without telling the optimizer the scaler (``grad_scaler=``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with autocast_disabled():
            self._step()
        return loss

    def _step(self) -> None:
        self._distributor.before_step(self)
        t = self.steps
        grad_divisor = self._resolve_grad_scale(t)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            warnings.warn(
                f"Step {t} skipped: the gradients contain inf/NaN (found_inf from GradScaler); "
                "it will be retried as the same step.",
                stacklevel=3,
            )
            self._clear_statistics()
            self._scales.forget(t)
            return
        self._check_statistics()
        self._distributor.synchronize(self)  # global gradients and statistics
        self._fallback_step(grad_divisor)
        with record_function(PROFILER_LABELS["refresh"]):
            self._refresh_due_layers(self._scales.h_c_unscale(t))
        with record_function(PROFILER_LABELS["precondition"]):
            natural_gradients = self._natural_gradients(grad_divisor)
        for index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            directions: list[Tensor] = []
            kl_terms: list[Tensor] = []
            for name, layer in self._layers.items():
                if self._group_of_layer[name] != index or layer.weight.grad is None:
                    continue
                G, update = natural_gradients[name]
                if group["kl_clip"] is not None:
                    kl_terms.append((G * update).sum())
                parts = layer.adapter.split_matrix(layer.module, update)
                for p, d in zip(layer.params, parts, strict=True):
                    if p.requires_grad and (p is layer.weight or p.grad is not None):
                        params.append(p)
                        directions.append(d)
            if kl_terms:
                nu = kl_clip_factor(kl_terms, lr=group["lr"], kl_clip=group["kl_clip"])
                directions = [d * nu.to(d.dtype) for d in directions]
            apply_parameter_step(
                params,
                directions,
                [self.state[p] for p in params],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )
        self._finish_step()

    def _resolve_grad_scale(self, t: int) -> float:
        """Fix :math:`s_t`; return what the gradients must be divided by (1 if unscaled).

        ``GradScaler.step`` sets ``grad_scale`` (gradients still scaled) unless the
        user called ``scaler.unscale_`` first (e.g. to clip): then ``grad_scale`` is
        None, the gradients are unscaled, but the curvature statistics still carry
        the scale, which is then read from the attached ``grad_scaler``.
        """
        grad_scale = getattr(self, "grad_scale", None)
        unscaled = grad_scale is None and hasattr(self, "found_inf")
        if unscaled:
            if self.grad_scaler is None:
                raise RuntimeError(
                    "scaler.unscale_(optimizer) was called before scaler.step(optimizer) "
                    "(e.g. to clip gradients), so the optimizer cannot see the gradient "
                    f"scale its curvature statistics carry. Construct {type(self).__name__}"
                    "(..., grad_scaler=scaler) so it can read the scale."
                )
            grad_scale = self.grad_scaler.get_scale()
        elif grad_scale is None and self.grad_scaler is not None and self.grad_scaler.is_enabled():
            grad_scale = self.grad_scaler.get_scale()  # a manual loop without scaler.step
        scale = self._scales.observe(t, grad_scale)
        return 1.0 if unscaled else scale

    def _natural_gradients(self, grad_divisor: float) -> dict[str, tuple[Tensor, Tensor]]:
        """(gradient matrix, natural gradient) of every layer with a gradient.

        This rank preconditions the layers it owns (all of them unless sharded); the
        distributor shares the results so every rank applies the same update.
        """
        grads: dict[str, Tensor] = {}
        for name, layer in self._layers.items():
            if layer.weight.grad is not None:
                G = layer.adapter.grad_matrix(layer.module)
                grads[name] = G / grad_divisor if grad_divisor != 1.0 else G
        owned = {
            name: self._precondition(self._layers[name], G)
            for name, G in grads.items()
            if self._distributor.owns(name)
        }
        updates = self._distributor.share_updates(self, owned)
        return {name: (G, updates[name]) for name, G in grads.items()}

    def synchronize_gradients(self) -> None:
        """Reduce the gradients over data-parallel ranks now, instead of in ``step()``.

        Only needed without the DDP wrapper, when something reads the gradients
        between backward and ``step()``: a ``GradScaler`` (its inf/NaN check must see
        the same gradients on every rank) or gradient clipping. Afterwards ``.grad``
        holds the full-batch gradient (averaged, or summed for ``loss_average=None``);
        the next ``step()`` does not reduce them again. A no-op on one process.
        """
        self._distributor.reduce_gradients(self)

    def _refresh_due_layers(self, h_c_unscale: float) -> None:
        """Refresh every due layer, then undo the refreshes that produced inf/NaN.

        One device synchronisation for all layers. A layer whose statistics or new
        factors are not finite keeps its previous factors; a warning names it once.
        """
        checks: list[tuple[Layer, Tensor, Callable[[], None]]] = []
        for name, layer in self._layers.items():
            due = layer.weight.grad is not None and self._refresh_due(self.group_of(name))
            if due and self._distributor.owns(name):
                finite, undo = self._refresh(layer, self.group_of(name), h_c_unscale)
                checks.append((layer, finite, undo))
        if not checks:
            return
        flags = torch.stack([finite.to(checks[0][1].device) for _, finite, _ in checks]).tolist()
        for (layer, _, undo), ok in zip(checks, flags, strict=True):
            if ok:
                continue
            undo()
            if layer.name not in self._warned_non_finite:
                self._warned_non_finite.add(layer.name)
                warnings.warn(
                    f"Layer {layer.name!r}: its curvature statistics or factor update contain "
                    f"inf/NaN at step {self.steps}; its factors are left as they were (this "
                    "warning is shown once per layer).",
                    stacklevel=4,
                )

    def _check_statistics(self) -> None:
        due = [
            layer
            for name, layer in self._layers.items()
            if self._refresh_due(self.group_of(name)) and layer.weight.grad is not None
        ]
        missing = [layer for layer in due if not self._has_statistics(layer)]
        if missing and len(missing) == len(due):
            raise RuntimeError(
                f"step() was called at a refresh step (step {self.steps}) but no backward pass "
                "ran through the model's layers since the last step, so there are no curvature "
                "statistics. Call zero_grad(), then forward and backward, then step()."
            )
        for layer in missing:
            reason = (
                "its weight has a gradient but its forward hook never fired (the weight is "
                "used without calling the module, e.g. nn.MultiheadAttention.out_proj)"
            )
            warnings.warn(
                f"Layer {layer.name!r} ({type(layer.module).__name__}): {reason}; its parameters "
                f"move to the fallback rule ({self.group_of(layer.name)['fallback']}).",
                stacklevel=3,
            )
            self._demote(layer, reason)

    def _fallback_step(self, grad_divisor: float) -> None:
        """Update the parameters without Kronecker factors with their group's rule."""
        for index, group in enumerate(self.param_groups):
            rule = group["fallback"]
            params = [
                p
                for p in group["params"]
                if self._fallback_group.get(p) == index and p.grad is not None
            ]
            if rule is None or not params:
                continue
            grads = [p.grad if grad_divisor == 1.0 else p.grad / grad_divisor for p in params]
            if rule == "adamw":
                adamw_step(
                    params,
                    grads,  # type: ignore[arg-type]
                    [self.state[p] for p in params],
                    lr=group["lr"],
                    betas=group["fallback_betas"],
                    eps=group["fallback_eps"],
                    weight_decay=group["weight_decay"],
                )
            else:
                apply_parameter_step(
                    params,
                    grads,  # type: ignore[arg-type]
                    [self.state[p] for p in params],
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                )

    def _finish_step(self) -> None:
        self.steps += 1
        self._scales.end_step(self.steps)

    # --- registration report -----------------------------------------------------------
    @abstractmethod
    def _describe_layer(self, layer: Layer) -> tuple[str, int]:
        """(text describing the layer's factors, bytes of its preconditioner state)."""

    def _state_bytes(self, params: Iterable[nn.Parameter]) -> int:
        return sum(
            t.numel() * t.element_size()
            for p in params
            for t in self.state.get(p, {}).values()
            if isinstance(t, Tensor)
        )

    def describe(self) -> str:
        """A table of how every trainable parameter of the model is handled.

        See :func:`singd.optim.registration.registration_report`.
        """
        return registration_report(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n{self.describe()}\n)"

    # --- checkpointing -----------------------------------------------------------------
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
        state[self._STATE_KEY] = {
            "steps": self.steps,
            "grad_scales": dict(self._scales.scales),
            "layers": self._distributor.gather_layer_states(
                self, {name: self._layer_state(layer) for name, layer in self._layers.items()}
            ),
            "fallback_layers": dict(self._demoted),
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
            if name in self._layers:
                self._demote(self._layers[name], reason)
        if set(own["layers"]) != set(self._layers):
            raise ValueError(
                f"The checkpoint holds layers {sorted(own['layers'])}, this optimizer has "
                f"{sorted(self._layers)}."
            )
        rest = {k: v for k, v in state_dict.items() if k != self._STATE_KEY}
        if len(rest["param_groups"]) != len(self.param_groups):
            raise ValueError("The checkpoint has a different number of param groups.")
        rest["param_groups"] = [
            self._restore_group(dict(saved), current)
            for saved, current in zip(rest["param_groups"], self.param_groups, strict=True)
        ]
        super().load_state_dict(rest)
        for group in self.param_groups:
            self._validate_group(group)
        self.steps = int(own["steps"])
        self._scales.scales = {int(k): float(v) for k, v in own["grad_scales"].items()}
        for name, layer in self._layers.items():
            if self._distributor.owns(name):  # sharded: each rank keeps only its layers
                self._load_layer_state(layer, own["layers"][name])
