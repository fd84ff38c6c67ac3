"""Hooks that hand a layer's input and output gradient to a callback.

A forward hook on each layer registers, when the layer is due for a curvature
update and gradients are enabled, a *tensor hook on the layer output*. Module
backward hooks are avoided on purpose: they break with in-place activations
(``ReLU(inplace=True)``, PyTorch issue 61519), while a tensor hook registered
before the in-place change receives the gradient of the layer's own output.
Forward passes under ``torch.no_grad()`` capture nothing. Models wrapped in
``torch.compile`` work: the hooks are excluded from compilation.

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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

StatisticsCallback = Callable[[str, Tensor, Tensor], None]


class _CaptureHook:
    """The forward hook of one captured layer (a marker type for :class:`_HookDict`)."""

    __slots__ = ("capture", "hook_id", "name")

    def __init__(self, capture: StatisticsCapture, name: str) -> None:
        self.capture = capture
        self.name = name
        self.hook_id = -1  # set once registered

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
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
        #: Layers whose forward hook ran (whatever the step): a layer never seen here
        #: although its weight has a gradient is used without calling the module.
        self.fired: set[str] = set()

    def add(self, name: str, module: nn.Module) -> None:
        """Start capturing ``module`` under ``name``."""
        if not module._forward_hooks:
            # No handle of the user's refers to the empty dict this replaces.
            module._forward_hooks = _HookDict()
        hook = _CaptureHook(self, name)
        handle = module.register_forward_hook(hook, with_kwargs=True)
        hook.hook_id = handle.id
        self._handles[name] = handle

    # Under torch.compile the hook runs eagerly (a graph break per captured layer):
    # tracing it would guard on the step counter and recompile at every step.
    @torch.compiler.disable
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

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
