r"""Whole-or-nothing optimizer steps without a host synchronisation.

A step that would write inf or NaN anywhere must change nothing: not the parameters,
not the momenta, not the factors, not the step counter. Deciding that on the host
would cost a device synchronisation per step (reading a flag back), which the
launch-bound step cannot afford. Instead a step is *computed out of place* and
*committed branch-free*:

1. Everything the step would write is computed into fresh tensors (new parameters,
   new momentum buffers, new factors, new AdamW moments).
2. :meth:`StepGuard.check` registers tensors that must be finite, under a label (a
   layer name). :meth:`StepGuard.require_zero` adds a flag that must be 0
   (``found_inf`` of a ``GradScaler``).
3. :attr:`StepGuard.ok` reduces all of it **on the device** to one 0-dim bool:
   one ``_foreach_norm(·, inf)`` over the checked tensors (max-abs: propagates
   inf/NaN and never overflows, unlike a sum), stacked and compared with a bound per
   tensor (``≤`` is False for NaN and inf), then ``all``: four operations for any
   number of tensors. The per-tensor results go to the host, which names the labels.
4. :meth:`StepGuard.commit_` writes ``torch.where(ok, new, old)`` into each old
   tensor (in place, no branch on the host; one kernel per tensor, or one stacked
   ``where`` for many small tensors of one shape: :mod:`singd.optim.branch_free`);
   :meth:`StepGuard.select_` does the same into the new tensors (for state that is
   replaced rather than overwritten, e.g. factor objects).
5. :meth:`StepGuard.verdict` starts a non-blocking copy of the per-check results to
   the host and returns a :class:`Verdict`; host-side bookkeeping that a skipped
   step must undo (the step counter, AdamW's step counts, gradient scales) is
   registered with :meth:`StepGuard.on_skip` and runs when the verdict is read.

:class:`~singd.optim.verdicts.VerdictQueue` holds the verdicts not read yet.
``poll(block=False)`` reads every verdict whose copy has completed, without waiting:
on the CPU at once (there is no device to wait for), on an accelerator when the device
has finished the step, checked with an event query. ``poll(block=True)`` waits (for
``state_dict()`` and for reading the step counter). Each failed verdict issues one
warning that names the step and the labels (layers) with inf/NaN, and runs its undo
callbacks.

**On CPUs** reading the verdict costs nothing (there is no device to wait for), while
``torch.where`` with a broadcast 0-dim condition is several times slower there than a
copy (measured: 3.1 of the 6.4 ms of a SINGD-diagonal ``step()`` on the benchmark
CNN, against 0.65 ms for SGD's whole ``step()``). So eagerly on a CPU
(:func:`~singd.structures._linalg.splits_work`) the commit reads ``ok`` and copies the
new values into the old tensors only if it holds (:meth:`StepGuard.commit_`), and puts
the old values back into the new tensors only if it fails (:meth:`StepGuard.select_`):
the same values as the branch-free commit, which accelerators and compiled code keep.

There a parameter step is not even computed out of place where a bound proves it
finite from the max-abs of the parameters, directions and momenta
(:func:`singd.optim.in_place.step_at_commit`): it is registered with
:meth:`StepGuard.on_commit` and written in place by :meth:`StepGuard.commit_` if the
step is ok, without fresh parameter-sized tensors (on a CPU they pay page faults) and
copies.

The module knows nothing about optimizers, so batched or sharded step
implementations use the same mechanism: check what they produce, commit with the
same ``ok``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from singd.optim.branch_free import where_all_into
from singd.optim.verdicts import Verdict
from singd.structures import _linalg


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writing it writes the DTensor), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


_BOUNDS_CACHE: dict[tuple[tuple[bool, ...], torch.dtype, torch.device], Tensor] = {}


def _bounds(squared: tuple[bool, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The largest max-abs each checked tensor may have: the largest finite value of
    ``dtype``, or √(float32 max) for those whose square must be finite in float32.
    Cached: a step checks the same tensors every time, and a fresh host-to-device copy
    per step would be avoidable work."""
    largest = torch.finfo(dtype).max
    root = torch.finfo(torch.float32).max ** 0.5
    if _linalg.tracing():  # (a constant of the graph; a cache lookup would guard on it)
        return torch.tensor([root if s else largest for s in squared], dtype=dtype, device=device)
    key = (squared, dtype, device)
    bounds = _BOUNDS_CACHE.get(key)
    if bounds is None:
        if len(_BOUNDS_CACHE) >= 64:
            _BOUNDS_CACHE.clear()
        values = [root if s else largest for s in squared]
        bounds = _BOUNDS_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return bounds


def max_abs_on_cpu(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The max-abs of each CPU tensor (0 for an empty one), as a ``dtype`` vector: one
    min-max pass per tensor, ~10× faster there than the infinity norm; inf and NaN
    propagate."""
    if not tensors:
        return torch.zeros(0, dtype=dtype)
    extremes = [torch.aminmax(t) if t.numel() else (t.new_zeros(()),) * 2 for t in tensors]
    return torch.maximum(
        torch.stack([e[1] for e in extremes]), -torch.stack([e[0] for e in extremes])
    ).to(dtype)


def _subtracting(value: Tensor, delta: Tensor) -> Callable[[], None]:
    """An undo that takes ``delta`` back off ``value`` (a host tensor of an accelerator step)."""

    def undo() -> None:
        value.sub_(delta)

    return undo


class StepGuard:
    """The finiteness checks of one step and its branch-free commit (module docstring).

    Args:
        device: Where the flags live (the parameters' device).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._labels: dict[str, int] = {}
        self._checked: list[Tensor] = []
        self._checked_label: list[int] = []
        self._squared: list[bool] = []
        self._sharded = False
        self._zero_flags: list[tuple[int, Tensor]] = []
        self._undo: list[Callable[[], None]] = []
        self._restores: list[tuple[list[Tensor], list[Tensor]]] = []
        self._resets: list[Tensor] = []
        self._passed: Tensor | None = None
        self._order: list[int] = []  # the label of each entry of passed
        self._ok: Tensor | None = None
        self._on_commit: list[Callable[[], None]] = []

    def _label(self, label: str) -> int:
        if self._passed is not None:
            raise RuntimeError("StepGuard: checks must be registered before ok is read.")
        return self._labels.setdefault(label, len(self._labels))

    def check(self, label: str, tensors: Iterable[Tensor], *, squared: bool = False) -> None:
        """Require every element of ``tensors`` to be finite; a failure names ``label``.

        DTensors (``fully_shard``) are checked by their local shards, and the failures are
        then summed over all ranks (one all-reduce, no host synchronisation), so every
        rank commits or skips the same step.
        """
        index = self._label(label)
        for t in tensors:
            if _is_dtensor(t):
                self._sharded = True
                t = t.to_local()  # type: ignore[attr-defined]
            if t.numel():
                self._checked.append(t)
                self._checked_label.append(index)
                self._squared.append(squared)

    def check_squares(self, label: str, tensors: Iterable[Tensor]) -> None:
        r"""Require the squares of ``tensors`` to be finite in float32: every entry below
        :math:`\sqrt{\text{float32 max}} \approx 1.8 \cdot 10^{19}` in magnitude.

        For gradients: the curvature statistics (:math:`g g^\top`) and AdamW's second
        moment hold their squares, so a larger gradient (a loss ×1e30, inputs ×1e20)
        would overflow them at the next refresh even where the step itself is finite.
        """
        self.check(label, tensors, squared=True)

    def require_zero(self, label: str, flag: Tensor) -> None:
        """Require ``flag`` (a 0-dim or 1-element tensor) to be 0, e.g. ``found_inf``."""
        self._zero_flags.append((self._label(label), flag))

    def on_skip(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` (host bookkeeping) if the step turns out to have failed."""
        self._undo.append(undo)

    def writes_in_place(self, tensors: Sequence[Tensor]) -> bool:
        """Whether an update of ``tensors`` may be written in place at the commit
        (:meth:`on_commit`), if proven finite in advance, instead of being computed out of
        place and copied: where this step's commit reads its verdict on the host
        (eagerly on a CPU, where that is free: module docstring), for plain tensors."""
        return (
            bool(tensors)
            and self.device.type == "cpu"
            and _linalg.splits_work(tensors[0])
            and not _linalg.tracing()
            and not any(_is_dtensor(t) or t.device.type != "cpu" for t in tensors)
        )

    def on_commit(self, update: Callable[[], None]) -> None:
        """Run the in-place ``update`` at :meth:`commit_` if the step is :attr:`ok`.

        Only for tensors that :meth:`writes_in_place`, and only for an update proven in
        advance to write finite values (it is not checked): it runs after the verdict,
        so it cannot change it.
        """
        if self.device.type != "cpu" or _linalg.tracing():
            raise RuntimeError(
                "StepGuard.on_commit needs the verdict on the host: CPUs, eagerly only."
            )
        self._on_commit.append(update)

    @property
    def passed(self) -> Tensor:
        """Per check (each checked tensor, then each zero flag): passed, as a bool vector
        on the device; computed once."""
        if self._passed is None:
            self._order = []
            parts: list[Tensor] = []
            for wide in (False, True):  # float64 tensors, and the others in float32
                members = [
                    i for i, t in enumerate(self._checked) if (t.dtype == torch.float64) == wide
                ]
                if members:
                    parts.append(self._within_bounds(members, wide))
                    self._order += [self._checked_label[i] for i in members]
            if self._zero_flags:
                flags = torch.stack(
                    [flag.to(self.device).reshape(()) for _, flag in self._zero_flags]
                )
                parts.append(flags == 0)
                self._order += [index for index, _ in self._zero_flags]
            if not parts:
                passed = torch.ones(0, dtype=torch.bool, device=self.device)
            else:
                passed = parts[0] if len(parts) == 1 else torch.cat(parts)
            if self._sharded and torch.distributed.is_initialized():
                # every rank the same verdict: failures per label (ranks may check
                # different numbers of tensors: empty shards are not checked), summed
                failures = torch.zeros(len(self._labels), dtype=torch.float32, device=self.device)
                order = torch.tensor(self._order, dtype=torch.int64, device=self.device)
                failures.index_add_(0, order, (~passed).float())
                torch.distributed.all_reduce(failures)
                passed = failures == 0
                self._order = list(range(len(self._labels)))
            self._passed = passed
            self._checked.clear()  # (do not keep the step's temporaries alive)
            self._checked_label.clear()
            self._squared.clear()
        return self._passed

    def _within_bounds(self, members: list[int], wide: bool) -> Tensor:
        """For each of the checked tensors ``members``: its max-abs is finite (or, where
        asked, its square is finite in float32), as one bool tensor on the device."""
        tensors = [self._checked[i] for i in members]
        # max-abs per tensor: inf/NaN propagate, finite values never overflow
        if _linalg.splits_work(tensors[0]):
            values = max_abs_on_cpu(tensors, torch.float64 if wide else torch.float32)
        else:  # accelerators: one multi-tensor kernel
            dtype = None if wide else torch.float32
            norms = torch._foreach_norm(tensors, float("inf"), dtype=dtype)
            values = torch.stack([n.to(self.device) for n in norms])
        # value ≤ bound: False for NaN and inf (bound: the dtype's largest finite
        # value, or √(float32 max) where the square must be finite)
        squared = tuple(self._squared[i] for i in members)
        return values <= _bounds(squared, values.dtype, self.device)

    @property
    def ok(self) -> Tensor:
        """0-dim bool on the device: every check passed."""
        if self._ok is None:
            self._ok = self.passed.all()
        return self._ok

    def _host_ok(self) -> bool | None:
        """:attr:`ok` read on the host where that is free: eagerly on a CPU (module
        docstring); None on accelerators and in compiled or vmapped code (branch-free)."""
        ok = self.ok
        if _linalg.tracing() or not _linalg.splits_work(ok):
            return None
        return bool(ok)

    def commit_(self, targets: Sequence[Tensor], new: Sequence[Tensor]) -> None:
        """``target ← new`` if :attr:`ok`, else unchanged; in place, without a host branch
        (on CPUs with one, where it is free: module docstring). On CPUs it also runs the
        updates registered with :meth:`on_commit` if :attr:`ok`."""
        host_ok = self._host_ok()
        if host_ok is not None:
            if host_ok:
                for target, value in zip(targets, new, strict=True):
                    _local(target).copy_(_local(value))
                for update in self._on_commit:
                    update()
            self._on_commit.clear()
            return
        if self._on_commit:  # (writes_in_place was False for them: never registered)
            raise RuntimeError("StepGuard: in-place updates need the verdict on the host.")
        local_targets = [_local(t) for t in targets]
        local_new = [_local(v) for v in new]
        where_all_into(local_targets, self.ok, local_new, local_targets)

    def select_(self, new: Sequence[Tensor], old: Sequence[Tensor]) -> None:
        """``new ← old`` unless :attr:`ok`: the new tensors hold the committed values.

        Host tensors of a step on an accelerator (e.g. AdamW's ``step`` count, a CPU
        scalar as in ``torch.optim``) cannot wait for the device's verdict: they keep
        the new value, and their change is undone when the verdict is read.
        """
        host_ok = self._host_ok()
        if host_ok is not None:
            if not host_ok:
                for value, previous in zip(new, old, strict=True):
                    _local(value).copy_(_local(previous))
            return
        values: list[Tensor] = []
        previous_values: list[Tensor] = []
        for value, previous in zip(new, old, strict=True):
            value, previous = _local(value), _local(previous)
            if value.device.type == "cpu" and self.device.type != "cpu":
                delta = value - previous
                self._undo.append(_subtracting(value, delta))
            else:
                values.append(value)
                previous_values.append(previous)
        where_all_into(values, self.ok, values, previous_values)

    def guard_in_place(
        self,
        labels: Sequence[str],
        params: list[Tensor],
        states: list[dict[str, Any]],
        update: Callable[[], None],
    ) -> None:
        """Run an in-place ``update`` of ``params`` and their ``states`` under the guard.

        For rules that can only write in place (the fallback rules, also registered
        ones): the parameters and their state tensors are copied first, ``update``
        runs, each parameter's results are checked under its label, and
        :meth:`finish` puts the copies back unless the step is :attr:`ok`. State
        tensors that ``update`` creates are set to zero unless ok (the value of an
        absent momentum or moment).
        """
        before = [dict(state) for state in states]
        old = list(params) + [
            t for state in before for t in state.values() if isinstance(t, Tensor)
        ]
        local = [_local(t) for t in old]  # (DTensors: their shards)
        snapshot = torch._foreach_mul(local, 1) if local else []  # (x·1 = x, also -0 and NaN)
        update()
        current = list(params)
        created: list[Tensor] = []
        for label, p, state, previous in zip(labels, params, states, before, strict=True):
            mine = [state[k] for k, t in previous.items() if isinstance(t, Tensor)]
            new = [t for k, t in state.items() if k not in previous and isinstance(t, Tensor)]
            current += mine
            created += new
            self.check(label, [t for t in (p, *mine, *new) if t.is_floating_point()])
        self._restores.append((current, list(snapshot)))
        self._resets += created

    def abort(self) -> None:
        """Put back what :meth:`guard_in_place` changed, unconditionally (the step raised)."""
        self._on_commit.clear()
        for current, snapshot in self._restores:
            for target, saved in zip(current, snapshot, strict=True):
                _local(target).copy_(_local(saved))
        for t in self._resets:
            t.zero_()
        self._restores.clear()
        self._resets.clear()

    def finish(self) -> None:
        """Commit what :meth:`guard_in_place` ran: restore the copies unless :attr:`ok`."""
        for current, snapshot in self._restores:
            self.select_(current, snapshot)
        if self._resets and self._host_ok() is not True:  # (nothing to reset if ok)
            for t in self._resets:
                self.select_([t], [torch.zeros_like(t)])
        self._restores.clear()
        self._resets.clear()

    def verdict(self, step: int) -> Verdict:
        """Start copying the outcome to the host (non-blocking on accelerators)."""
        passed = self.passed
        if passed.device.type == "cpu":
            host, event = passed, None
        else:
            host = torch.empty(passed.shape, dtype=passed.dtype, pin_memory=True)
            host.copy_(passed, non_blocking=True)
            event = torch.Event(device=passed.device)
            event.record()
        # (read once ready: never a device synchronisation; benchmarks/op_count.py
        # does not count reads of tensors marked so)
        host._singd_host_copy = True  # type: ignore[attr-defined]
        labels = list(self._labels)
        return Verdict(step, [labels[i] for i in self._order], host, event, list(self._undo))
