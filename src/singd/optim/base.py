"""The step skeleton every Kronecker-factored optimizer here shares.

:class:`KroneckerOptimizer` is a ``torch.optim.Optimizer`` over the layers of
``model`` that have a registered adapter (:mod:`singd.layers`; the
:class:`~singd.optim.layer_registry.LayerRegistry` finds them and the parameters
that get the first-order *fallback* rule instead). Each layer has one
:class:`~singd.preconditioners.LayerPreconditioner`; each param group a validated
configuration (:mod:`singd.config`). ``step()``:

1. the distribution strategy checks consistency (:mod:`singd.distributed`);
2. the gradient scale :math:`s_t` is fixed (GradScaler protocol, :mod:`singd.amp`);
   a step whose gradients hold inf/NaN is skipped and does not count;
3. layers due for a refresh (``step % T == 0``) with a gradient but without
   statistics are demoted to the fallback (their hooks never fired), with a warning;
4. gradients and the due layers' statistics become global over ranks;
5. the fallback rule updates the parameters without factors
   (:mod:`singd.optim.fallback`);
6. the due layers' preconditioners refresh; one device synchronisation checks all
   of them for inf/NaN and undoes those that are not finite (warned once per layer);
7. every layer with a gradient is preconditioned (each rank its own layers when
   sharded; the strategy shares the results);
8. per param group: optional KL clipping, then weight decay, heavy-ball momentum and
   the learning rate (:func:`singd.functional.apply_parameter_step`);
9. ``steps`` is incremented.

Statistics are captured at refresh steps by :mod:`singd.capture` hooks; phases are
named for ``torch.profiler`` (:data:`PROFILER_LABELS`); checkpoints are
:mod:`singd.optim.checkpoint`. Subclasses (:class:`~singd.optim.singd.SINGD`,
:class:`~singd.optim.kfac.KFAC`) give the group validation, the configuration class
and a preconditioner factory.
"""

from __future__ import annotations

import warnings
from abc import ABC
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from singd.amp import GradScaleTracker, autocast_disabled, resolve_grad_scale
from singd.capture import StatisticsCapture
from singd.config import GroupConfig
from singd.distributed import Distributor, KroneckerLayer, resolve_distributor, unwrap_model
from singd.functional import apply_parameter_step, kl_clip_factor
from singd.optim.checkpoint import CheckpointMixin
from singd.optim.fallback import fallback_step
from singd.optim.groups import GroupConfigs
from singd.optim.layer_registry import Layer, LayerGroupsMixin, LayerRegistry
from singd.optim.validation import (
    BOUNDS,
    FALLBACK_DEFAULTS,
    check_bool,
    check_grad_scaler,
    resolve_lr_cov,
)
from singd.preconditioners import LayerPreconditioner, refresh_all

__all__ = ["PROFILER_LABELS", "KroneckerOptimizer", "Layer"]

#: ``torch.profiler`` ranges around the optimizer's phases (besides torch.optim's own
#: ``Optimizer.step#…`` range): the curvature statistics of each layer, computed in
#: the backward hooks at refresh steps; the factor refresh; the preconditioning of the
#: gradients. ``benchmarks/step_breakdown.py`` times a step by them.
PROFILER_LABELS: dict[str, str] = {
    "statistics": "singd::statistics",
    "refresh": "singd::refresh",
    "precondition": "singd::precondition",
}


class KroneckerOptimizer(LayerGroupsMixin, CheckpointMixin, ABC):
    """Base class: layers, hooks, group configurations and the step skeleton."""

    _step_supports_amp_scaling = True  # GradScaler sets grad_scale/found_inf (torch convention)

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
        self._distributor = resolve_distributor(distributed, wrapper, model)
        defaults = {**FALLBACK_DEFAULTS, "kl_clip": None, **defaults}
        check_bool("warn_unsupported", warn_unsupported)
        BOUNDS["init_grad_scale"].check(init_grad_scale)
        check_grad_scaler(grad_scaler)
        self.model = model
        self.grad_scaler = grad_scaler
        if grad_scaler is not None and grad_scaler.is_enabled() and init_grad_scale == 1.0:
            init_grad_scale = grad_scaler.get_scale()
        self._registry = LayerRegistry(model, self._unsupported_reason)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            untrained = self._registry.untrained(params)
            if defaults["fallback"] is None:
                params = [p for p in params if p in self._registry.layer_of_param]
                if untrained and warn_unsupported:
                    warnings.warn(
                        f"{type(self).__name__}(fallback=None) will not train: "
                        + self._registry.describe_params(untrained)
                        + ". Use fallback='adamw' or 'sgd' to train them in this optimizer.",
                        stacklevel=3,
                    )
        self._preconditioners: dict[str, LayerPreconditioner] = {}
        self._groups: GroupConfigs[GroupConfig] = GroupConfigs(self._validated_config)
        self._capture = StatisticsCapture(self._is_due, self._on_statistics)
        self._scales = GradScaleTracker(init_grad_scale)
        self._warned_non_finite: set[str] = set()
        self.steps = 0
        super().__init__(params, defaults)
        self._distributor.attach(self, wrapper)

    # --- what the distribution strategies and checkpoint helpers read ------------------
    @property
    def distributor(self) -> Distributor:
        """The data-parallel strategy (:mod:`singd.distributed`) this optimizer runs with."""
        return self._distributor

    @property
    def layers(self) -> Mapping[str, Layer]:
        """Every layer with Kronecker factors, by name, in registration order (read-only)."""
        return MappingProxyType({name: pre.layer for name, pre in self._preconditioners.items()})

    def statistics(self, layer: KroneckerLayer) -> tuple[list[Tensor], list[bool]]:
        """A due layer's live accumulators (reduced in place over ranks) and their AVG
        (True) / SUM (False) flags: the input side averaged; the output side averaged
        unless the loss is summed (``loss_average=None``; ``docs/distributed.md``)."""
        input_side, output_side = self._preconditioners[layer.name].statistics()
        averaged = self.group_of(layer.name)["loss_average"] is not None
        flags = [True] * len(input_side) + [averaged] * len(output_side)
        return [*input_side, *output_side], flags

    def drop_statistics(self, layer: KroneckerLayer) -> None:
        """Forget a layer's accumulators (another rank refreshes it)."""
        self._preconditioners[layer.name].drop_statistics()

    def gradients(self) -> tuple[list[Tensor], list[bool]]:
        """The gradients of every parameter this optimizer updates (Kronecker layers and
        the fallback), in param-group order, with their AVG (True) / SUM (False) flags.

        Raises:
            RuntimeError: For sparse gradients (they cannot be reduced over ranks).
        """
        grads: list[Tensor] = []
        average: list[bool] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            "Sparse gradients cannot be reduced over ranks; use dense gradients."
                        )
                    grads.append(p.grad)
                    average.append(group["loss_average"] is not None)
        return grads, average

    def factor_sizes(self, layer: KroneckerLayer) -> tuple[int, int]:
        """The numbers of stored entries of the layer's two factors (K and C)."""
        plan = self._preconditioners[layer.name].plan
        return plan.structure_K.num_stored(plan.d_K), plan.structure_C.num_stored(plan.d_C)

    def param_name(self, param: Tensor) -> str:
        """The name of a parameter in the model (``"?"`` if it is not the model's)."""
        return self._param_names.get(param, "?")  # type: ignore[call-overload]

    @property
    def state_key(self) -> str:
        """The key of the optimizer-specific section of :meth:`state_dict`."""
        return self._STATE_KEY

    # --- capture -----------------------------------------------------------------------
    def _is_due(self, layer_name: str) -> bool:
        return (
            layer_name in self._preconditioners
            and self.steps % self._layer_config(layer_name).T == 0
        )

    def due_layers(self) -> list[Layer]:
        """The layers refreshed in this step: due, and with a weight gradient."""
        return [
            pre.layer
            for name, pre in self._preconditioners.items()
            if pre.layer.weight.grad is not None and self._is_due(name)
        ]

    def _on_statistics(self, layer_name: str, x: Tensor, grad_output: Tensor) -> None:
        pre = self._preconditioners[layer_name]
        with autocast_disabled(), record_function(PROFILER_LABELS["statistics"]):
            pre.accumulate(x, grad_output, self._scales.previous(self.steps))

    def set_current_grad_scale(self, scale: float) -> None:
        """Tell the optimizer the gradient scale :math:`s_t` of the coming ``step()``."""
        self._scales.set_current(self.steps, scale)

    # --- step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Refresh the due preconditioners, then update every parameter (module docstring).

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
            self._groups.invalidate()  # (the user may have edited a group since)
            self._step()
        return loss

    def _step(self) -> None:
        self._distributor.before_step(self)
        t = self.steps
        grad_divisor = resolve_grad_scale(self, self._scales, t)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            warnings.warn(
                f"Step {t} skipped: the gradients contain inf/NaN (found_inf from GradScaler); "
                "it will be retried as the same step.",
                stacklevel=3,
            )
            for pre in self._preconditioners.values():
                pre.drop_statistics()
            self._scales.forget(t)
            return
        self._check_statistics()
        self._distributor.synchronize(self)
        fallback_step(
            self.param_groups,
            [self._config(i) for i in range(len(self.param_groups))],
            self._registry.fallback_group,
            self.state,
            grad_divisor,
        )
        with record_function(PROFILER_LABELS["refresh"]):
            self._refresh_due_layers(self._scales.h_c_unscale(t))
        with record_function(PROFILER_LABELS["precondition"]):
            natural_gradients = self._natural_gradients(grad_divisor)
        for index, group in enumerate(self.param_groups):
            config = self._config(index)
            params: list[Tensor] = []
            directions: list[Tensor] = []
            kl_terms: list[Tensor] = []
            for name, pre in self._preconditioners.items():
                layer = pre.layer
                if self._registry.group_of_layer[name] != index or layer.weight.grad is None:
                    continue
                G, update = natural_gradients[name]
                if config.kl_clip is not None:
                    kl_terms.append((G * update).sum())
                parts = layer.adapter.split_matrix(layer.module, update)
                for p, d in zip(layer.params, parts, strict=True):
                    if p.requires_grad and (p is layer.weight or p.grad is not None):
                        params.append(p)
                        directions.append(d)
            if kl_terms and config.kl_clip is not None:
                nu = kl_clip_factor(kl_terms, lr=group["lr"], kl_clip=config.kl_clip)
                directions = [d * nu.to(d.dtype) for d in directions]
            apply_parameter_step(
                params,
                directions,
                [self.state[p] for p in params],
                lr=group["lr"],
                momentum=config.momentum,
                weight_decay=config.weight_decay,
            )
        self.steps += 1
        self._scales.end_step(self.steps)
        self._groups.invalidate()

    def _natural_gradients(self, grad_divisor: float) -> dict[str, tuple[Tensor, Tensor]]:
        """(gradient matrix, natural gradient) of every layer with a gradient.

        This rank preconditions the layers it owns (all of them unless sharded); the
        distributor shares the results so every rank applies the same update.
        """
        grads: dict[str, Tensor] = {}
        for name, pre in self._preconditioners.items():
            if pre.layer.weight.grad is not None:
                G = pre.layer.adapter.grad_matrix(pre.layer.module)
                grads[name] = G / grad_divisor if grad_divisor != 1.0 else G
        owned = {
            name: self._preconditioners[name].precondition(G)
            for name, G in self._distributor.owned_gradients(self, grads).items()
        }
        updates = self._distributor.share_updates(self, owned, grads)
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
        todo: list[tuple[LayerPreconditioner, float]] = []
        lr_covs: dict[int, float] = {}  # β₁ of each group at this step (read live)
        for layer in self.due_layers():
            if not self._distributor.owns(layer.name):
                continue
            index = self._registry.group_of_layer[layer.name]
            if index not in lr_covs:
                lr_covs[index] = self._lr_cov(index)
            todo.append((self._preconditioners[layer.name], lr_covs[index]))
        for name in (pre.name for pre in refresh_all(todo, h_c_unscale)):
            if name not in self._warned_non_finite:
                self._warned_non_finite.add(name)
                warnings.warn(
                    f"Layer {name!r}: its curvature statistics or factor update contain "
                    f"inf/NaN at step {self.steps}; its factors are left as they were (this "
                    "warning is shown once per layer).",
                    stacklevel=4,
                )

    def _lr_cov(self, index: int) -> float:
        """β₁ of group ``index`` at this step (read live: a number or a schedule), checked."""
        return resolve_lr_cov(self.param_groups[index]["lr_cov"], self.steps, table=self._BOUNDS)

    def _check_statistics(self) -> None:
        due = self.due_layers()
        missing = [layer for layer in due if not self._preconditioners[layer.name].has_statistics()]
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
            self._demote(layer.name, reason)
