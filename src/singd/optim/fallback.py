"""First-order rules for the parameters without Kronecker factors, as a registry.

A *fallback rule* updates, in place, the parameters of one param group that get
no Kronecker factors (norm layers, raw parameters, shared weights, layers whose
hooks never fire). It receives the parameters, their (unscaled) gradients, their
``optimizer.state`` dicts and the group's validated configuration, plus the live
learning rate. The built-in rules are ``"adamw"`` and ``"sgd"``
(:class:`singd.config.Fallback`); ``fallback=None`` trains none of them.
A new rule is a function plus :func:`register_fallback`::

    def sign_sgd(params, grads, states, config, lr):
        for p, g in zip(params, grads):
            p.add_(g.sign(), alpha=-lr)

    register_fallback("signsgd", sign_sgd)
    SINGD(model, fallback="signsgd")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from singd.config import Fallback
from singd.functional import apply_parameter_step
from singd.functional.first_order import adamw_step
from singd.functional.scalars import Scalar

if TYPE_CHECKING:
    from singd.config import GroupConfig

FallbackRule = Callable[
    [list[Tensor], list[Tensor], list[dict[str, Tensor]], "GroupConfig", float], None
]


def adamw_rule(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    config: GroupConfig,
    lr: Scalar,
) -> None:
    """AdamW with the group's ``fallback_betas``, ``fallback_eps`` and decoupled decay."""
    adamw_step(
        params,
        grads,
        states,
        lr=lr,
        betas=config.fallback_betas,
        eps=config.fallback_eps,
        weight_decay=config.weight_decay,
    )


def sgd_rule(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    config: GroupConfig,
    lr: Scalar,
) -> None:
    """SGD with the group's heavy-ball ``momentum`` and coupled ``weight_decay``."""
    apply_parameter_step(
        params,
        grads,
        states,
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


_FALLBACKS: dict[str, FallbackRule] = {
    Fallback.ADAMW.value: adamw_rule,
    Fallback.SGD.value: sgd_rule,
}


#: The rules that also take ``lr`` as a 0-d tensor (the compiled step's, where a float
#: would recompile the graph whenever a scheduler changes it).
_TENSOR_LR_RULES: frozenset[FallbackRule] = frozenset(_FALLBACKS.values())


def takes_tensor_lr(rule: FallbackRule) -> bool:
    """Whether ``rule`` accepts ``lr`` as a 0-d tensor (the built-in rules); a
    registered rule is given a float, as its signature says."""
    return rule in _TENSOR_LR_RULES


def register_fallback(name: str, rule: FallbackRule) -> None:
    """Make ``fallback=name`` train the parameters without factors with ``rule``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"A fallback rule's name must be a non-empty string, got {name!r}.")
    if not callable(rule):
        raise TypeError(f"A fallback rule must be callable, got {rule!r}.")
    _FALLBACKS[name] = rule


def unregister_fallback(name: str) -> None:
    """Remove a rule added with :func:`register_fallback` (no-op if absent)."""
    if name not in (m.value for m in Fallback):
        _FALLBACKS.pop(name, None)


@contextlib.contextmanager
def scoped_registration() -> Iterator[None]:
    """Fallback rules registered inside the ``with`` block are removed at its end."""
    rules = dict(_FALLBACKS)
    try:
        yield
    finally:
        _FALLBACKS.clear()
        _FALLBACKS.update(rules)


def available_fallbacks() -> tuple[str | None, ...]:
    """The valid values of ``fallback``: the registered rule names, then None."""
    return (*_FALLBACKS, None)


def find_fallback(name: str) -> FallbackRule:
    """The rule registered as ``name``.

    Raises:
        ValueError: For an unknown name; the message lists the valid choices.
    """
    try:
        return _FALLBACKS[name]
    except KeyError:
        raise ValueError(f"Invalid fallback {name!r}. Valid: {available_fallbacks()}.") from None


def fallback_step(
    param_groups: list[dict[str, Any]],
    configs: list[GroupConfig],
    fallback_group: Mapping[nn.Parameter, int],
    state: Mapping[Tensor, dict[str, Tensor]],
    grad_divisor: float,
) -> None:
    """Update every parameter without Kronecker factors with its group's rule.

    Args:
        param_groups: The optimizer's param groups (``lr`` is read live).
        configs: Their configurations.
        fallback_group: The group index of every fallback parameter.
        state: ``optimizer.state``.
        grad_divisor: The gradient scale to divide the gradients by (1: unscaled).
    """
    for index, (group, config) in enumerate(zip(param_groups, configs, strict=True)):
        params = [
            p for p in group["params"] if fallback_group.get(p) == index and p.grad is not None
        ]
        if config.fallback is None or not params:
            continue
        grads = [p.grad if grad_divisor == 1.0 else p.grad / grad_divisor for p in params]
        rule = find_fallback(config.fallback)
        rule(params, grads, [state[p] for p in params], config, group["lr"])
