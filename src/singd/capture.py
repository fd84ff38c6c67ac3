"""Hooks that hand a layer's input and output gradient to a callback.

A forward hook on each layer registers, when the layer is due for a curvature
update and gradients are enabled, a *tensor hook on the layer output*. Module
backward hooks are avoided on purpose: they break with in-place activations
(``ReLU(inplace=True)``, PyTorch issue 61519), while a tensor hook registered
before the in-place change receives the gradient of the layer's own output.
Forward passes under ``torch.no_grad()`` capture nothing. Models wrapped in
``torch.compile`` work: the hooks are excluded from compilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

StatisticsCallback = Callable[[str, Tensor, Tensor], None]


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
        #: The layers whose forward hook has run at least once: a layer with a weight
        #: gradient that is not in here is used without calling the module (e.g.
        #: ``nn.MultiheadAttention.out_proj``); one in here was merely unused in a step.
        self.fired: set[str] = set()

    def add(self, name: str, module: nn.Module) -> None:
        """Start capturing ``module`` under ``name``."""

        # Under torch.compile the hook runs eagerly (a graph break per captured layer):
        # tracing it would guard on the step counter and recompile at every step.
        @torch.compiler.disable
        def forward_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            self.fired.add(name)
            if not (torch.is_grad_enabled() and isinstance(output, Tensor)):
                return
            if not output.requires_grad or not self._is_due(name):
                return
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach()

            def tensor_hook(grad_output: Tensor) -> None:
                self._on_statistics(name, x, grad_output.detach())

            output.register_hook(tensor_hook)

        self._handles[name] = module.register_forward_hook(forward_hook, with_kwargs=True)

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
