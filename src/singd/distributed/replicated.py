r"""Replicated data parallelism: every rank holds and refreshes every layer's factors.

Per step, at most one collective per bucket (default: one per dtype for everything):

* the due layers' accumulated statistics (:math:`H_K`, :math:`H_C` for SINGD;
  :math:`U`, :math:`G` for KFAC) are all-reduced, flattened into buckets — the
  published code blocks on one all-reduce per tensor per layer inside backward;
* without the DDP wrapper, the gradients of every parameter the optimizer updates
  (Kronecker layers *and* fallback parameters) travel in the same buckets. Reducing
  the gradient before preconditioning equals the published "all-reduce the natural
  gradient", because preconditioning is linear and the factors are identical;
* with the DDP wrapper the gradients arrive averaged; for ``loss_average=None`` they
  are multiplied by the world size (the summed loss's gradient is the sum).

AVG versus SUM follows :mod:`singd.distributed.base`. Every rank then computes the
same refresh and preconditioning from the same inputs, so parameters and factors
stay identical (bitwise with deterministic kernels; ``check_every`` verifies it).

This is the right mode for structured factors (diagonal, block-diagonal, …): the
statistics are as small as the factors, and every rank's refresh is cheap. For
large dense factors see :class:`~singd.distributed.sharded.Sharded`.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import Tensor, nn

from singd.distributed.base import Distributor, is_dtensor, parameter_checksums, statistics
from singd.distributed.collectives import broadcast_coalesced, launch_all_reduce
from singd.distributed.protocol import DistributedOptimizer


class Replicated(Distributor):
    """Every rank keeps every factor; statistics and gradients are all-reduced in buckets.

    Args:
        process_group: The ranks to train with (None: the DDP wrapper's group if the
            model is wrapped, else the default group).
        bucket_mb: Largest flat buffer per collective, in MiB (None: one buffer per
            dtype; 0: one collective per tensor, as the published code).
        overlap: Launch all buckets asynchronously, then wait (False: one blocking
            collective after the other).
        check_every: Every this many steps, compare a checksum of the parameters
            across ranks and raise ``RuntimeError`` if they differ (None: never).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        bucket_mb: float | None = None,
        overlap: bool = True,
        check_every: int | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"{type(self).__name__} needs torch.distributed: call "
                "torch.distributed.init_process_group() first."
            )
        if check_every is not None and (
            isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
        ):
            raise ValueError(
                f"check_every must be a positive integer or None, got {check_every!r}."
            )
        if bucket_mb is not None and bucket_mb < 0:
            raise ValueError(f"bucket_mb must be non-negative or None, got {bucket_mb}.")
        self.group = process_group
        self.bucket_bytes = None if bucket_mb is None else int(bucket_mb * 2**20)
        self.overlap = overlap
        self.check_every = check_every
        self.wrapped = False
        self._optimizer: DistributedOptimizer | None = None
        # Gradients made global by synchronize_gradients() before this step (weak
        # references: a zero_grad(set_to_none=True) or a new tensor invalidates them).
        self._reduced: list[weakref.ref[Tensor]] | None = None
        self._pre_reduced = False
        self._set_group(process_group)

    def _set_group(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # --- hooks ---------------------------------------------------------------------------
    def attach(self, optimizer: DistributedOptimizer, wrapper: nn.Module | None) -> None:
        """Bind to the optimizer; without the DDP wrapper, start all ranks from rank 0's
        parameters and buffers, as the wrapper does at construction."""
        if self._optimizer is not None and self._optimizer is not optimizer:
            raise ValueError(f"This {type(self).__name__} already serves another optimizer.")
        if any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
            raise TypeError(
                f"{type(self).__name__} cannot train DTensor (fully_shard) parameters; use "
                "distributed='auto' or 'fsdp2'."
            )
        self._optimizer = optimizer
        self.wrapped = wrapper is not None
        if wrapper is not None and self.group is None:
            self._set_group(getattr(wrapper, "process_group", None))
        if not self.wrapped and self.world_size > 1:
            model = optimizer.model
            tensors = [t.data for t in model.parameters()] + [
                b for b in model.buffers() if b.dtype != torch.bool
            ]
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            with torch.no_grad():
                broadcast_coalesced(tensors, src=src, group=self.group)

    def before_step(self, optimizer: DistributedOptimizer) -> None:
        """Refuse a GradScaler whose inf check saw local gradients; run the periodic check.

        A :meth:`reduce_gradients` call counts for the next ``step()`` only (skipped or not).
        """
        self._pre_reduced = self._gradients_already_reduced(optimizer)
        self._reduced = None
        if getattr(optimizer, "found_inf", None) is not None and not self._pre_reduced:
            self._refuse_local_scaler_check()
        if self.check_every is not None and optimizer.steps % self.check_every == 0:
            self.check_parameters(optimizer)

    def before_unscale(self, optimizer: DistributedOptimizer) -> None:
        """Refuse ``scaler.unscale_`` (also inside ``scaler.step``) on local gradients."""
        if not self._gradients_already_reduced(optimizer):
            self._refuse_local_scaler_check()

    def _refuse_local_scaler_check(self) -> None:
        if self.wrapped or self.world_size == 1:
            return
        raise RuntimeError(
            "A GradScaler checked this step's gradients before they were reduced over the "
            "ranks, so ranks could disagree on skipping it. Without the "
            "DistributedDataParallel wrapper, call optimizer.synchronize_gradients() after "
            "backward and before scaler.unscale_/scaler.step (or wrap the model in DDP)."
        )

    def reduce_gradients(self, optimizer: DistributedOptimizer) -> None:
        """Make the gradients global now (before a GradScaler or clipping reads them)."""
        self._reduced = None
        self._pre_reduced = False
        self._all_reduce(*self._gradients_to_reduce(optimizer))
        grads, _ = optimizer.gradients()
        self._reduced = [weakref.ref(g) for g in grads]

    def synchronize(self, optimizer: DistributedOptimizer) -> None:
        """Gradients (unless already global) and due statistics, in shared buckets."""
        grads, grad_average = self._gradients_to_reduce(optimizer)
        stats, stat_average, _ = statistics(optimizer, optimizer.due_layers())
        self._all_reduce(grads + stats, grad_average + stat_average)

    def _all_reduce(self, tensors: list[Tensor], average: list[bool]) -> None:
        launch_all_reduce(
            tensors,
            average,
            world_size=self.world_size,
            group=self.group,
            bucket_bytes=self.bucket_bytes,
            overlap=self.overlap,
        )()

    # --- gradients -----------------------------------------------------------------------
    def _gradients_already_reduced(self, optimizer: DistributedOptimizer) -> bool:
        """Whether :meth:`reduce_gradients` ran on the current gradient tensors."""
        if self._reduced is None:
            return False
        grads, _ = optimizer.gradients()
        return len(grads) == len(self._reduced) and all(
            ref() is g for g, ref in zip(grads, self._reduced, strict=True)
        )

    def _gradients_to_reduce(
        self, optimizer: DistributedOptimizer
    ) -> tuple[list[Tensor], list[bool]]:
        """The gradients still to all-reduce, with their averaging flags: all of them
        without the wrapper; none if the wrapper averaged them (then the average is
        turned into the sum for ``loss_average=None``) or if they are already global."""
        if self._pre_reduced:
            self._pre_reduced = False
            return [], []
        if self.world_size == 1:
            return [], []
        if self.wrapped:
            for grad, averaged in zip(*optimizer.gradients(), strict=True):
                if not averaged:
                    grad.mul_(self.world_size)
            return [], []
        return optimizer.gradients()

    # --- consistency ---------------------------------------------------------------------
    def check_parameters(self, optimizer: DistributedOptimizer) -> None:
        """Raise ``RuntimeError`` if any parameter differs between ranks (a collective).

        Compares one float64 sum per parameter: the max and min over ranks must agree
        exactly, since the ranks apply bitwise-identical updates.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sums = parameter_checksums(params)
        if params:
            sums = sums.to(params[0].device)
        both = torch.cat([sums, -sums])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        n = len(params)
        differ = (both[:n] != -both[n:]).nonzero().flatten().tolist()
        if differ:
            names = [optimizer.param_name(params[i]) for i in differ]
            raise RuntimeError(
                f"Parameters differ between ranks at step {optimizer.steps}: "
                f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}. All ranks must "
                "start from the same parameters and run the same layers every step."
            )
