"""The step skeleton every Kronecker-factored optimizer here shares.

:class:`KroneckerOptimizer` is a ``torch.optim.Optimizer`` over the layers of
``model`` that have a registered adapter (:mod:`singd.layers`; the
:class:`~singd.optim.layer_registry.LayerRegistry` finds them and the parameters
that get the first-order *fallback* rule instead). Each layer has one
:class:`~singd.preconditioners.LayerPreconditioner`; each param group a validated
configuration (:mod:`singd.config`). ``step()`` happens whole or not at all
(:mod:`singd.optim.guard`), without a host synchronisation:

1. verdicts of earlier steps that have reached the host are read (a skipped step
   is taken off ``steps``, with a warning naming it and the layers);
2. the distribution strategy checks consistency (:mod:`singd.distributed`);
3. the gradient scale :math:`s_t` is fixed (GradScaler protocol, :mod:`singd.amp`)
   and each due group's β₁ resolved (a raising schedule changes nothing);
4. layers due for a refresh (``step % T == 0``) with a gradient but without
   statistics are demoted to the fallback if their forward hook never ran (with a
   warning), else left as they are (unused in this step);
5. gradients and the due layers' statistics become global over ranks;
6. the due layers' preconditioners refresh into new tensors; every layer with a
   gradient is preconditioned (each rank its own layers when sharded; the
   strategy shares the results);
7. per param group: optional KL clipping, then weight decay, heavy-ball momentum and
   the learning rate, out of place (:func:`singd.functional.parameter_step`);
8. the fallback rules update the parameters without factors in place, under a
   snapshot (:mod:`singd.optim.fallback`);
9. one device-side verdict (every new tensor finite, every gradient's square finite
   in float32, ``found_inf`` zero) commits all of it with ``torch.where``, or none;
10. ``steps`` is incremented, and the verdict starts its way to the host.

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

from singd.amp import (
    GradScaleTracker,
    autocast_disabled,
    notify_unscale,
    resolve_grad_scale,
    scaler_found_inf,
)
from singd.capture import StatisticsCapture
from singd.config import GroupConfig
from singd.distributed import Distributor, KroneckerLayer, resolve_distributor, unwrap_model
from singd.functional.scalars import Scalar
from singd.layers import Layer
from singd.optim.checkpoint import CheckpointMixin
from singd.optim.groups import GroupConfigs
from singd.optim.guard import StepGuard
from singd.optim.layer_registry import LayerGroupsMixin, LayerRegistry
from singd.optim.pending import PendingStatistics
from singd.optim.phases import PROFILER_LABELS, StepPhasesMixin, profiler_range
from singd.optim.step_state import StepStateMixin
from singd.optim.validation import (
    BOUNDS,
    FALLBACK_DEFAULTS,
    check_bool,
    check_grad_scaler,
    resolve_lr_cov,
)
from singd.optim.verdicts import VerdictQueue
from singd.preconditioners import LayerPreconditioner
from singd.preconditioners.base import Refreshed

__all__ = ["PROFILER_LABELS", "KroneckerOptimizer", "Layer"]


class KroneckerOptimizer(LayerGroupsMixin, CheckpointMixin, StepPhasesMixin, StepStateMixin, ABC):
    """Base class: layers, hooks, group configurations and the step skeleton."""

    #: False: ``scaler.step`` unscales the gradients and skips ``step()`` on inf/NaN
    #: (torch's default protocol, which frameworks clip with); the scale the curvature
    #: statistics carry is learnt from ``scaler.unscale_`` (:func:`singd.amp.notify_unscale`).
    _step_supports_amp_scaling = False

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
        given_params = params is not None
        if params is None:
            # Every parameter, frozen ones too (as AdamW(model.parameters())): a layer
            # unfrozen later is trained; a frozen one costs nothing (no statistics).
            params = list(model.parameters())
            untrained = [p for p in self._registry.untrained(params) if p.requires_grad]
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
        self._pending = PendingStatistics(self._statistics_scope)
        self._scales = GradScaleTracker(init_grad_scale)
        self._verdicts = VerdictQueue(self._describe_skip)
        self._unscaled_step: int | None = None  # the step whose gradients a scaler unscaled
        notify_unscale()
        self.steps = 0
        self._compiled_device_step = None
        super().__init__(params, defaults)
        self._distributor.attach(self, wrapper)
        self._deferred = any(p.is_meta for g in self.param_groups for p in g["params"])
        if warn_unsupported and defaults["fallback"] is not None and not given_params:
            self._warn_if_mostly_fallback(stacklevel=4)

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
        pre = self._preconditioners.get(layer_name)
        return (  # (a frozen weight needs no statistics)
            pre is not None
            and pre.layer.weight.requires_grad
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
        previous_scale = self._scales.previous(self.steps)
        key = pre.statistics_key(x, grad_output)
        if key is not None:  # (formed with equal layers' at the end of the backward pass)
            self._pending.add(key, pre, x, grad_output, previous_scale)
            return
        with autocast_disabled(), profiler_range(PROFILER_LABELS["statistics"]):
            pre.accumulate(x, grad_output, previous_scale)

    @staticmethod
    def _statistics_scope(accumulate: Callable[[], None]) -> None:
        """How waiting statistics are accumulated (:mod:`singd.optim.pending`)."""
        with autocast_disabled(), profiler_range(PROFILER_LABELS["statistics"]):
            accumulate()

    def _before_unscale(self, scaler: torch.amp.GradScaler) -> None:
        """``scaler.unscale_(self)`` is about to check and unscale the gradients."""
        self._pending.flush()
        self._distributor.before_unscale(self)

    def _after_unscale(self, scaler: torch.amp.GradScaler) -> None:
        """``scaler.unscale_(self)`` ran (:func:`singd.amp.notify_unscale`).

        The gradients of this step are now unscaled, the statistics still carry the
        scale, which ``step()`` reads from ``scaler``. If the scaler found inf/NaN it
        will not call ``step()``: the step is skipped here (statistics dropped, the
        counter kept), as ``step()`` skips it for ``found_inf`` (one host read, which
        ``scaler.step`` makes anyway).
        """
        if self.grad_scaler is None:
            self.grad_scaler = scaler  # created after the optimizer (accelerate, Lightning)
        if scaler_found_inf(scaler, self):
            warnings.warn(
                f"Step {self.steps} skipped: the gradients contain inf/NaN (found by "
                "GradScaler.unscale_); it will be retried as the same step.",
                stacklevel=3,
            )
            for pre in self._preconditioners.values():
                pre.drop_statistics()
            self._scales.forget(self.steps)
            self._unscaled_step = None
            return
        self._unscaled_step = self.steps

    def _statistics_overflow_risk(self) -> bool:
        """Whether some layer forms its curvature statistics in float16."""
        return any(
            torch.float16 in (pre.dtype_K, pre.dtype_C) for pre in self._preconditioners.values()
        )

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
        self._pending.flush()  # (normally done at the end of the backward pass)
        # Earlier steps' verdicts that have reached the host (never waits): a step
        # found skipped is taken off the step counter before this one is numbered.
        corrected = self._read_verdicts()
        if self._deferred:
            corrected = self._follow_materialised_parameters() or corrected
        self._distributor.before_step(self)
        t = self.steps
        scales_before = dict(self._scales.scales)
        try:
            self._guarded_step(t, corrected)
        except BaseException:
            self._scales.scales = scales_before  # an exception changes nothing
            raise
        self._read_verdicts(just_ran=(t, scales_before))  # on the CPU: this step's, at once

    def _guarded_step(self, t: int, corrected: bool) -> None:
        """Compute the whole step, then commit it only if all of it is finite.

        Everything that can raise on the host (the gradient scale, the user's
        ``lr_cov`` schedule) runs first; the refreshes, natural gradients and
        parameter updates are computed out of place; the fallback rules, which write
        in place, run last under a snapshot; then one device-side verdict commits all
        of it or none (:mod:`singd.optim.guard`).
        """
        grad_divisor = resolve_grad_scale(self, self._scales, t)
        found_inf = getattr(self, "found_inf", None)
        due = self._check_statistics(relaxed=corrected)
        lr_covs = {  # (the user's schedule runs before anything changes)
            index: self._lr_cov(index)
            for index in {self._registry.group_of_layer[layer.name] for layer in due}
        }
        self._distributor.synchronize(self)
        guard = StepGuard(self._guard_device())
        if found_inf is not None:
            guard.require_zero("found_inf from the GradScaler", found_inf)
        refreshed = Refreshed()
        scalars: tuple[Mapping[int, Scalar], Mapping[int, Scalar], Scalar, Scalar] = (
            {index: group["lr"] for index, group in enumerate(self.param_groups)},
            lr_covs,
            self._scales.h_c_unscale(t),
            grad_divisor,
        )
        device_step = self._device_step
        if self._compiled_device_step is not None:  # (device scalars: no recompiles)
            device_step = self._compiled_device_step
            scalars = self._step_scalars(*scalars)
        lrs, lr_covs_, h_c_unscale, divisor = scalars
        try:
            device_step(due, lrs, lr_covs_, h_c_unscale, divisor, guard, refreshed)
        except BaseException:
            guard.abort()
            for restore in reversed(refreshed.undo):
                restore()
            raise
        for pre in self._preconditioners.values():
            pre.drop_statistics()  # (also those of layers not due after a correction)
        self.steps += 1
        self._scales.end_step(self.steps)
        self._groups.invalidate()
        self._verdicts.push(guard.verdict(t))

    def _lr_cov(self, index: int) -> float:
        """β₁ of group ``index`` at this step (read live: a number or a schedule), checked."""
        return resolve_lr_cov(self.param_groups[index]["lr_cov"], self.steps, table=self._BOUNDS)

    def synchronize_gradients(self) -> None:
        """Reduce the gradients over data-parallel ranks now, instead of in ``step()``.

        Only needed without the DDP wrapper, when something reads the gradients
        between backward and ``step()``: a ``GradScaler`` (its inf/NaN check must see
        the same gradients on every rank) or gradient clipping. Afterwards ``.grad``
        holds the full-batch gradient (averaged, or summed for ``loss_average=None``);
        the next ``step()`` does not reduce them again. A no-op on one process.
        """
        self._distributor.reduce_gradients(self)
