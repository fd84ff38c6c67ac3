"""The phases of a guarded step: refresh, preconditioning, parameter updates, fallback.

Each phase computes *new* tensors and registers them with the step's
:class:`~singd.optim.guard.StepGuard` under the name of the layer (or parameter) they
belong to; :class:`~singd.optim.base.KroneckerOptimizer` commits all of it or none.

Preconditioners are processed in **batches**: the due (resp. gradient-carrying)
preconditioners of one param group and class with equal
:meth:`~singd.preconditioners.LayerPreconditioner.batch_key` go to the class's
``refresh_batch`` / ``precondition_batch`` together (SINGD's diagonal layers: a
number of operations that does not grow with the number of layers); every other
layer is one batch of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.profiler import record_function

from singd.config import GroupConfig
from singd.functional import kl_clip_factor, parameter_step
from singd.functional.scalars import Scalar, is_one
from singd.optim.fallback import find_fallback, takes_tensor_lr
from singd.optim.guard import StepGuard
from singd.optim.in_place import step_at_commit
from singd.preconditioners import LayerPreconditioner
from singd.preconditioners.base import Refreshed

if TYPE_CHECKING:
    from singd.distributed import Distributor
    from singd.layers import Layer
    from singd.optim.layer_registry import LayerRegistry


#: ``torch.profiler`` ranges around the optimizer's phases (besides torch.optim's own
#: ``Optimizer.step#…`` range): the curvature statistics of each layer, computed in
#: the backward hooks at refresh steps; the factor refresh; the preconditioning of the
#: gradients. ``benchmarks/step_breakdown.py`` times a step by them.
PROFILER_LABELS: dict[str, str] = {
    "statistics": "singd::statistics",
    "refresh": "singd::refresh",
    "precondition": "singd::precondition",
}


def profiler_range(name: str) -> contextlib.AbstractContextManager[object]:
    """``record_function(name)`` while a profiler runs, else nothing.

    Opening a range dispatches two operations even without a profiler (host time on
    every step, and per layer in the backward hooks); compiled code skips them.
    """
    if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
        return record_function(name)
    return contextlib.nullcontext()


class StepPhasesMixin:
    """The phases of ``KroneckerOptimizer._guarded_step`` (module docstring)."""

    _preconditioners: dict[str, LayerPreconditioner]
    _registry: LayerRegistry
    _distributor: Distributor
    param_groups: list[dict[str, Any]]
    state: Any
    #: the compiled :meth:`_device_step` (:meth:`compile`), None: eager
    _compiled_device_step: Callable[..., None] | None = None
    #: its hyper-parameter tensors by key: (value they hold, tensor) (:meth:`_step_scalars`)
    _scalar_tensors: dict[Hashable, Any]
    if TYPE_CHECKING:  # (LayerGroupsMixin provides them)

        def _config(self, index: int) -> GroupConfig: ...

        @property
        def _param_names(self) -> dict[Any, str]: ...

        def _guard_device(self) -> torch.device: ...

    def _batches(self, pres: Sequence[LayerPreconditioner]) -> list[list[LayerPreconditioner]]:
        """``pres`` grouped by (param group, class, batch key), in order of appearance;
        a preconditioner without a key (or alone) is a batch of one."""
        batches: dict[Hashable, list[LayerPreconditioner]] = {}
        for pre in pres:
            key = pre.batch_key()
            if key is None or not self._distributor.replicates_factors:
                batches[("alone", pre.name)] = [pre]
                continue
            index = self._registry.group_of_layer[pre.name]
            batches.setdefault((index, type(pre), key), []).append(pre)
        return list(batches.values())

    # --- the device side of a step --------------------------------------------------
    def _device_step(
        self,
        due: list[Layer],
        lrs: Mapping[int, Scalar],
        lr_covs: Mapping[int, Scalar],
        h_c_unscale: Scalar,
        grad_divisor: Scalar,
        guard: StepGuard,
        refreshed: Refreshed,
    ) -> None:
        """The device side of a step, committed: refresh, preconditioning, parameter and
        fallback updates, the guard's verdict and the branch-free commit. No host reads
        (:meth:`compile` compiles it into one graph).

        ``lrs`` (η of every param group), ``lr_covs`` (β₁ of the due groups), the
        factor ``h_c_unscale`` and ``grad_divisor`` (the gradient scale) are floats
        eagerly, and 0-d device tensors in the compiled step (:meth:`_step_scalars`).
        """
        with profiler_range(PROFILER_LABELS["refresh"]):
            self._refresh_layers(due, lr_covs, h_c_unscale, guard, refreshed)
        with profiler_range(PROFILER_LABELS["precondition"]):
            batched, single = self._directions(grad_divisor, guard)
        targets, values = self._parameter_updates(batched, single, lrs, guard)
        self._guarded_fallback(guard, grad_divisor, lrs)
        guard.finish()
        guard.commit_(targets, values)
        for new, old in refreshed.replaced:
            guard.select_(new, old)
        for after_commit in refreshed.after_commit:
            after_commit()

    def compile(self, **options: Any) -> None:
        """Compile the device side of ``step()`` with ``torch.compile(fullgraph=True,
        **options)``: the refresh, the preconditioning, the parameter updates and the
        commit become one graph per kind of step (refresh or not), without graph breaks.

        The host side (verdicts of earlier steps, the refresh schedule, the gradient
        scale, ``lr_cov`` schedules) stays eager around it, so skipped steps are still
        reported and taken off ``steps``. The hyper-parameters that change between
        steps (``lr`` of every group, ``lr_cov``, the gradient scale of a
        ``GradScaler``) enter the graph as 0-d tensors on the parameters' device, as
        a tensor ``lr`` does in a compiled ``torch.optim`` optimizer, so an LR
        scheduler, an ``lr_cov`` schedule and a changing gradient scale do not
        recompile (:meth:`_step_scalars`). Other group settings (``momentum``,
        ``weight_decay``, ``T``, ...) are constants of the graph: editing one
        recompiles. Fallback rules get ``lr`` as that tensor too, also those registered
        with :func:`~singd.optim.fallback.register_fallback`, except one registered
        with ``tensor_lr=False``: it gets a float, so with it a changing ``lr``
        recompiles.

        Data parallelism: with replicated factors (``distributed="replicated"``, the
        default behind ``DistributedDataParallel``) the reductions run on the host
        side, before the graph, and the compiled step equals the eager one.

        Raises:
            ValueError: With sharded factors (``distributed="sharded"``, FSDP2): their
                step shares the natural gradients with asynchronous collectives
                inside the device step, which ``torch.compile`` cannot trace.
        """
        if not self._distributor.replicates_factors:
            raise ValueError(
                f"compile() does not support the {type(self._distributor).__name__} "
                "distribution strategy: sharded factors share the natural gradients with "
                "asynchronous collectives inside the step, which torch.compile cannot "
                "trace. Use distributed='replicated' (every rank holds every factor; "
                "the default with DistributedDataParallel), or keep the step eager."
            )
        self._compiled_device_step = torch.compile(self._device_step, fullgraph=True, **options)
        self._scalar_tensors = {}

    def _step_scalars(
        self,
        lrs: Mapping[int, Scalar],
        lr_covs: Mapping[int, Scalar],
        h_c_unscale: Scalar,
        grad_divisor: Scalar,
    ) -> tuple[dict[int, Scalar], dict[int, Scalar], Scalar, Scalar]:
        """The hyper-parameters of a compiled step as 0-d tensors on the parameters'
        device: one cached tensor per value, refilled (``fill_``: one operation, no
        allocation, no host read) only when the value changed. A gradient scale or
        ``h_c_unscale`` of exactly 1 (no scaler) stays the number 1, which skips its
        multiplication (a second graph if a scaler appears later, not one per value).
        The tensors are float64 where a parameter is, else float32.
        """
        cache = self._scalar_tensors
        device = self._guard_device()
        dtype = cache.get(("dtype", device))
        if dtype is None:  # (once per device: not a loop over the parameters per step)
            wide = device.type != "mps" and any(
                p.dtype == torch.float64 for group in self.param_groups for p in group["params"]
            )
            dtype = cache[("dtype", device)] = torch.float64 if wide else torch.float32

        def tensor(key: Hashable, value: Scalar) -> Scalar:
            if isinstance(value, Tensor):  # (a tensor lr of the user's: as it is)
                return value
            value = float(value)
            entry = cache.get(key)
            if entry is None or entry[1].device != device or entry[1].dtype != dtype:
                entry = cache[key] = (value, torch.tensor(value, dtype=dtype, device=device))
            elif entry[0] != value:
                entry[1].fill_(value)
                cache[key] = (value, entry[1])
            return entry[1]

        return (
            {index: tensor(("lr", index), lr) for index, lr in lrs.items()},
            {index: tensor(("lr_cov", index), lr_cov) for index, lr_cov in lr_covs.items()},
            h_c_unscale if is_one(h_c_unscale) else tensor("h_c_unscale", h_c_unscale),
            grad_divisor if is_one(grad_divisor) else tensor("grad_divisor", grad_divisor),
        )

    # --- refresh -----------------------------------------------------------------------
    def _refresh_layers(
        self,
        due: list[Layer],
        lr_covs: Mapping[int, Scalar],
        h_c_unscale: Scalar,
        guard: StepGuard,
        refreshed: Refreshed,
    ) -> None:
        """Refresh the due layers this rank owns, into new tensors checked by the guard;
        what they replaced and how to undo it is added to ``refreshed``."""
        owned = [
            self._preconditioners[layer.name]
            for layer in due
            if self._distributor.owns(layer.name)
            # (none: unused in this step, or a correction of the schedule)
            and self._preconditioners[layer.name].has_statistics()
        ]
        for batch in self._batches(owned):
            lr_cov = lr_covs[self._registry.group_of_layer[batch[0].name]]
            part = type(batch[0]).refresh_batch(batch, lr_cov, h_c_unscale)
            refreshed.extend(part)
            for name, tensors in part.checks:
                guard.check(f"layer {name!r}", tensors)

    # --- preconditioning ---------------------------------------------------------------
    def _directions(
        self, grad_divisor: Scalar, guard: StepGuard
    ) -> tuple[dict[str, list[Tensor]], dict[str, tuple[Tensor, Tensor]]]:
        """The natural gradients of every layer with a gradient, the gradients checked.

        Returns:
            ``(batched, single)``: for layers preconditioned in a batch, their
            directions split like ``layer.params``; for the others, (gradient matrix,
            natural gradient). This rank preconditions the layers it owns (all of them
            unless sharded); the distributor shares the results.
        """
        with_grad = [
            pre for pre in self._preconditioners.values() if pre.layer.weight.grad is not None
        ]
        batched: dict[str, list[Tensor]] = {}
        alone: list[LayerPreconditioner] = []
        for batch in self._batches(with_grad):
            if len(batch) == 1 or any(p.grad is None for pre in batch for p in pre.layer.params):
                alone += batch
                continue
            for pre, directions in zip(
                batch, type(batch[0]).precondition_batch(batch, grad_divisor), strict=True
            ):
                grads_of = [p.grad for p in pre.layer.params if p.grad is not None]
                guard.check_squares(f"layer {pre.name!r}", grads_of)
                batched[pre.name] = directions
        grads: dict[str, Tensor] = {}
        for pre in alone:
            G = pre.layer.adapter.grad_matrix()
            grads[pre.name] = G if is_one(grad_divisor) else G / grad_divisor
            guard.check_squares(f"layer {pre.name!r}", [grads[pre.name]])
        owned = {
            name: self._preconditioners[name].precondition(G)
            for name, G in self._distributor.owned_gradients(self, grads).items()  # type: ignore[arg-type]
        }
        updates = self._distributor.share_updates(self, owned, grads)  # type: ignore[arg-type]
        return batched, {name: (G, updates[name]) for name, G in grads.items()}

    # --- parameters --------------------------------------------------------------------
    def _parameter_updates(
        self,
        batched: dict[str, list[Tensor]],
        single: dict[str, tuple[Tensor, Tensor]],
        lrs: Mapping[int, Scalar],
        guard: StepGuard,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """New values of the Kronecker layers' parameters and momentum buffers (not
        written yet), checked under each layer's name; returns (targets, new values)."""
        targets: list[Tensor] = []
        values: list[Tensor] = []
        for index in range(len(self.param_groups)):
            config = self._config(index)
            params: list[Tensor] = []
            directions: list[Tensor] = []
            kl_terms: list[Tensor] = []
            labels: list[str] = []
            for name, pre in self._preconditioners.items():
                layer = pre.layer
                if self._registry.group_of_layer[name] != index:
                    continue
                if name in batched:  # (every parameter has a gradient: all get the update)
                    params += layer.params
                    directions += batched[name]
                    labels += [f"layer {name!r}"] * len(layer.params)
                    continue
                if name not in single:
                    continue
                G, update = single[name]
                if config.kl_clip is not None:
                    kl_terms.append((G * update).sum())
                parts = layer.adapter.split_matrix(update)
                for p, d in zip(layer.params, parts, strict=True):
                    if self._trains_with_factors(layer, p):
                        params.append(p)
                        directions.append(d.clone() if d is p.grad else d)
                        labels.append(f"layer {name!r}")
            if not params:
                continue
            if kl_terms and config.kl_clip is not None:
                nu = kl_clip_factor(kl_terms, lr=lrs[index], kl_clip=config.kl_clip)
                directions = [d * nu.to(d.dtype) for d in directions]
            buffers = None
            if config.momentum != 0:
                buffers = []
                for param in params:
                    state = self.state[param]
                    if "momentum_buffer" not in state:  # (zeros: the same first step)
                        state["momentum_buffer"] = torch.zeros_like(param)
                    buffers.append(state["momentum_buffer"])
            step: dict[str, Any] = {"lr": lrs[index], "momentum": config.momentum}
            step["weight_decay"] = config.weight_decay
            # (CPUs: in place at the commit, if proven finite)
            if step_at_commit(guard, params, directions, buffers, **step):
                continue
            new_params, new_buffers = parameter_step(params, directions, buffers, **step)
            for label, new_p in zip(labels, new_params, strict=True):
                guard.check(label, [new_p])
            for label, new_b in zip(labels, new_buffers, strict=False):
                guard.check(label, [new_b])
            targets += params + (buffers or [])
            values += [*new_params, *new_buffers]
        return targets, values

    def _orphans(self, index: int) -> list[Tensor]:
        """Parameters of group ``index``'s layers with a gradient while the layer's
        weight is frozen (a trainable bias): the fallback rule trains them."""
        return [
            p
            for name, pre in self._preconditioners.items()
            if self._registry.group_of_layer[name] == index and not pre.layer.weight.requires_grad
            for p in pre.layer.params
            if p is not pre.layer.weight and p.grad is not None
        ]

    @staticmethod
    def _trains_with_factors(layer: Layer, p: Tensor) -> bool:
        """Whether ``p`` (a parameter of ``layer``) gets the Kronecker update this step."""
        return p.requires_grad and (p is layer.weight or p.grad is not None)

    # --- fallback ----------------------------------------------------------------------
    def _guarded_fallback(
        self, guard: StepGuard, grad_divisor: Scalar, lrs: Mapping[int, Scalar]
    ) -> None:
        """The fallback rules (in place) under the guard, per parameter name."""
        for index, group in enumerate(self.param_groups):
            config = self._config(index)
            params = [
                p
                for p in group["params"]
                if self._registry.fallback_group.get(p) == index and p.grad is not None
            ]
            params += self._orphans(index)
            if config.fallback is None or not params:
                continue
            grads = [p.grad if is_one(grad_divisor) else p.grad / grad_divisor for p in params]
            names = [f"parameter {self._param_names.get(p, '?')!r}" for p in params]
            for name, g in zip(names, grads, strict=True):
                guard.check_squares(name, [g])
            rule = find_fallback(config.fallback)
            states = [self.state[p] for p in params]
            # (a tensor in the compiled step, but for a rule registered for floats only)
            lr = lrs[index] if takes_tensor_lr(config.fallback) else group["lr"]

            def update(
                rule: Any = rule,
                params: list[Tensor] = params,
                grads: list[Tensor] = grads,
                states: list[dict[str, Any]] = states,
                config: GroupConfig = config,
                lr: Scalar = lr,
            ) -> None:
                rule(params, grads, states, config, lr)

            guard.guard_in_place(names, params, states, update)
