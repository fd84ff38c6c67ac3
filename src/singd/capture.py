"""Hooks that hand a layer's input and output gradient to a callback.

A forward hook on each layer registers, when the layer is due for a curvature
update and gradients are enabled, a *tensor hook on the layer output*. Module
backward hooks are avoided on purpose: they break with in-place activations
(``ReLU(inplace=True)``, PyTorch issue 61519), while a tensor hook registered
before the in-place change receives the gradient of the layer's own output.
Forward passes under ``torch.no_grad()`` capture nothing.

Two cases need more than that one tensor hook:

* **Outputs that are views.** ``nn.Linear`` on a 3-d input and ``transformers``'
  ``Conv1D`` return a view of a 2-d result. An in-place op on a view
  (``relu_``, ``x[mask] = v``) rebases the view's autograd history, and a hook
  registered on the view before it never fires. When the view is the whole base in
  the same element order (those layers), a second hook on the base delivers the
  same gradient, reshaped, if the view's hook did not fire; any other view is
  replaced by a copy (at refresh steps only) so that its hook survives.
* **Copies of the model.** ``torch.save(model)`` and ``copy.deepcopy(model)`` (EMA
  and teacher models) must neither fail on the hooks nor copy them: a captured
  module's forward-hook dict leaves the capture hooks out of every copy and pickle
  (:class:`_HookDict`), so a copy holds no reference to the optimizer and feeds it
  no statistics. (A module that had forward hooks of its own before the optimizer
  keeps its dict, whose handles the user holds; there a copied capture hook becomes a
  placeholder that does nothing and deletes itself at the copy's first call.)

**Under** ``torch.compile`` the forward hook is traced into the model's graph (no
graph break) and takes another route, the same at every step so that nothing
recompiles: the output passes through :class:`_Tap`, an ``autograd.Function``
that copies it and saves the input; its backward hands both to
``singd::deliver_statistics``, an opaque custom op with an ordered effect (so
AOTAutograd and Inductor keep it although it returns nothing). That op runs eagerly
inside the compiled backward and asks *there* whether the layer is due: the schedule
(the optimizer's step counter, each group's ``T``) never becomes a guard. In eager
mode the tap is not used; the tensor hook is registered at refresh steps only, so
plain steps dispatch no extra operation. Statistics-wise this route is the eager
one: in-place ops on (view) outputs act on the copy, and copies of the model carry
no capture hook to trace.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch._library.effects import EffectType
from torch.utils.hooks import RemovableHandle

StatisticsCallback = Callable[[str, Tensor, Tensor], None]

#: Each capture hook's number (a constant in the compiled graph), and who receives the
#: statistics of its tap: slot -> (capture, layer name).
_NEXT_SLOT = itertools.count()
_RECEIVERS: dict[int, tuple[weakref.ref[StatisticsCapture], str]] = {}


@torch.library.custom_op("singd::deliver_statistics", mutates_args=())
def _deliver_statistics(x: Tensor, grad_output: Tensor, slot: int) -> None:
    """Hand a compiled layer's input and output gradient to its capture, if it is due."""
    receiver = _RECEIVERS.get(slot)
    capture = receiver[0]() if receiver is not None else None
    if capture is not None:
        capture._deliver(receiver[1], x, grad_output)  # type: ignore[index]


@_deliver_statistics.register_fake
def _(x: Tensor, grad_output: Tensor, slot: int) -> None:
    return None


# An op without outputs is dead code to AOTAutograd and Inductor unless it has an effect.
_deliver_statistics.register_effect(EffectType.ORDERED)


class _Tap(torch.autograd.Function):
    """Identity on a compiled layer's output whose backward delivers the statistics."""

    @staticmethod
    def forward(output: Tensor, x: Tensor, slot: int) -> Tensor:
        # A copy, not a view: autograd forbids in-place ops (ReLU(inplace=True), x[m] = v)
        # on a view made inside a Function. Inductor inlines the copy into its consumers.
        return output.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.slot = inputs[2]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        torch.ops.singd.deliver_statistics(x, grad_output, ctx.slot)
        return grad_output, None, None


class _CaptureHook:
    """The forward hook of one captured layer (a marker type for :class:`_HookDict`)."""

    __slots__ = ("capture", "hook_id", "name", "slot")

    def __init__(self, capture: StatisticsCapture, name: str, slot: int) -> None:
        self.capture = capture
        self.name = name
        self.slot = slot
        self.hook_id = -1  # set once registered

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if torch.compiler.is_compiling():
            return _forward_compiled(self.slot, args, kwargs, output)
        return self.capture._forward(self.name, args, kwargs, output)

    def __reduce__(self) -> Any:
        # Copied inside a plain hook dict (the module had hooks of its own before):
        # the copy gets a placeholder that holds no optimizer and removes itself.
        return (_RemovedHook, (self.hook_id,))


class _RemovedHook:
    """What a copied capture hook becomes: it does nothing and deletes itself."""

    __slots__ = ("hook_id",)

    def __init__(self, hook_id: int) -> None:
        self.hook_id = hook_id

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        # _call_impl iterates over a snapshot of the hooks: deleting here is safe.
        module._forward_hooks.pop(self.hook_id, None)
        module._forward_hooks_with_kwargs.pop(self.hook_id, None)
        module._forward_hooks_always_called.pop(self.hook_id, None)


class _HookDict(OrderedDict):
    """A module's ``_forward_hooks`` whose copies and pickles omit the capture hooks.

    ``nn.Module`` pickles and deep-copies its ``__dict__``; this dict reduces to a
    plain ``OrderedDict`` of the user's own hooks, so the copy has no reference to
    the optimizer (pickling works) and no hook that would feed it statistics.
    """

    def __reduce__(self) -> Any:
        kept = [(k, v) for k, v in self.items() if not isinstance(v, _CaptureHook)]
        return (OrderedDict, (), None, None, iter(kept))


def _forward_compiled(slot: int, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """The forward hook as Dynamo traces it: the same graph at every step (module docstring)."""
    if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
        return None
    x = args[0] if args else next(iter(kwargs.values()))
    return _Tap.apply(output, x.detach(), slot)


def _is_whole_base(view: Tensor, base: Tensor) -> bool:
    """Whether ``view`` is ``base`` reshaped (same elements in the same order)."""
    return (
        view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
        and view.is_contiguous()
        and base.is_contiguous()
    )


class StatisticsCapture:
    """Installs and removes the hooks of a set of named layers.

    Args:
        is_due: Whether the named layer wants statistics in the current step.
        on_statistics: Called as ``on_statistics(name, input, grad_output)`` once
            per forward/backward pair through the layer.
    """

    def __init__(self, is_due: Callable[[str], bool], on_statistics: StatisticsCallback) -> None:
        self._is_due = is_due
        self._on_statistics = on_statistics
        self._handles: dict[str, RemovableHandle] = {}
        self._slots: dict[str, int] = {}
        #: Layers whose forward hook ran (whatever the step): a layer never seen here
        #: although its weight has a gradient is used without calling the module.
        self.fired: set[str] = set()

    def add(self, name: str, module: nn.Module) -> None:
        """Start capturing ``module`` under ``name``."""
        if not module._forward_hooks:
            # No handle of the user's refers to the empty dict this replaces.
            module._forward_hooks = _HookDict()
        slot = next(_NEXT_SLOT)
        hook = _CaptureHook(self, name, slot)
        handle = module.register_forward_hook(hook, with_kwargs=True)
        hook.hook_id = handle.id
        self._handles[name] = handle
        self._slots[name] = slot
        _RECEIVERS[slot] = (weakref.ref(self), name)

    def _deliver(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """A compiled backward reached the layer: capture if it is due (runs eagerly)."""
        self.fired.add(name)
        if self._is_due(name):
            self._on_statistics(name, x, grad_output)

    def _forward(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        self.fired.add(name)
        if not (torch.is_grad_enabled() and isinstance(output, Tensor)):
            return None
        if not output.requires_grad or not self._is_due(name):
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        x = x.detach()
        base = output._base if output._is_view() else None
        if base is None:
            output.register_hook(lambda g: self._on_statistics(name, x, g.detach()))
            return None
        if base.grad_fn is None or not _is_whole_base(output, base):
            # A partial view: a copy of our own keeps its hook through in-place ops.
            output = output.clone()
            output.register_hook(lambda g: self._on_statistics(name, x, g.detach()))
            return output
        seen = [False]
        shape = output.shape

        def view_hook(g: Tensor) -> None:
            seen[0] = True
            self._on_statistics(name, x, g.detach())

        def base_hook(g: Tensor) -> None:
            # Fires after view_hook; alone when an in-place op replaced the view's history.
            if not seen[0]:
                self._on_statistics(name, x, g.detach().reshape(shape))

        output.register_hook(view_hook)
        base.register_hook(base_hook)
        return None

    def discard(self, name: str) -> None:
        """Stop capturing the layer ``name`` (no-op if it is not captured)."""
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.remove()
        self._release(name)

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        for name in list(self._slots):
            self._release(name)

    def _release(self, name: str) -> None:
        """Stop receiving the statistics of ``name``'s tap."""
        slot = self._slots.pop(name, None)
        if slot is not None:
            _RECEIVERS.pop(slot, None)
