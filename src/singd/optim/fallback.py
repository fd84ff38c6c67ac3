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

**The learning rate** is the group's ``lr`` as it is: a Python float in an eager
step; in a compiled step (:meth:`~singd.optim.phases.StepPhasesMixin.compile`) a 0-d
tensor on the parameters' device (:mod:`singd.functional.scalars`), so that an LR
scheduler does not recompile the step. Arithmetic, torch operations and the
``alpha=`` / ``value=`` arguments of ``add_``, ``add``, ``addcmul_``, ``addcdiv_`` and
``torch._foreach_add_`` take it as they take a float (``torch.compile`` turns them
into a multiply-add). ``float(lr)``, ``math`` functions of it and branching on its
value read it back to the host, which ``torch.compile`` may refuse (so does
``sub_(…, alpha=lr)``) and which stalls a GPU. A rule that needs a float is registered
with ``tensor_lr=False``: it gets ``lr`` as a float in the compiled step too, and a
changing ``lr`` then recompiles the step. (The built-in rules round a bfloat16 or
float16 parameter's update as eagerly, :func:`singd.functional.scalars.minus_scaled`;
a rule of the user's rounds as its operations do on a tensor ``lr``.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from torch import Tensor

from singd.config import Fallback
from singd.functional import apply_parameter_step
from singd.functional.first_order import adamw_step
from singd.functional.scalars import Scalar

if TYPE_CHECKING:
    from singd.config import GroupConfig

#: ``rule(params, grads, states, config, lr)``; ``lr`` is a float, or a 0-d tensor in a
#: compiled step (module docstring).
FallbackRule = Callable[
    [list[Tensor], list[Tensor], list[dict[str, Tensor]], "GroupConfig", Scalar], None
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

#: The names of the rules registered with ``tensor_lr=False`` (a float ``lr`` always).
_FLOAT_LR: set[str] = set()


def takes_tensor_lr(name: str) -> bool:
    """Whether the rule registered as ``name`` gets ``lr`` as a 0-d tensor in a compiled
    step (every rule but those registered with ``tensor_lr=False``)."""
    return name not in _FLOAT_LR


def register_fallback(name: str, rule: FallbackRule, *, tensor_lr: bool = True) -> None:
    """Make ``fallback=name`` train the parameters without factors with ``rule``.

    Args:
        name: The value of ``fallback`` that selects the rule.
        rule: ``rule(params, grads, states, config, lr)``, updating ``params`` in place.
        tensor_lr: Whether ``lr`` may be a 0-d tensor in a compiled step (the default;
            module docstring). False: ``rule`` gets a float there too, and a changing
            ``lr`` recompiles the step.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"A fallback rule's name must be a non-empty string, got {name!r}.")
    if not callable(rule):
        raise TypeError(f"A fallback rule must be callable, got {rule!r}.")
    _FALLBACKS[name] = rule
    if tensor_lr:
        _FLOAT_LR.discard(name)
    else:
        _FLOAT_LR.add(name)


def unregister_fallback(name: str) -> None:
    """Remove a rule added with :func:`register_fallback` (no-op if absent)."""
    if name not in (m.value for m in Fallback):
        _FALLBACKS.pop(name, None)
        _FLOAT_LR.discard(name)


@contextlib.contextmanager
def scoped_registration() -> Iterator[None]:
    """Fallback rules registered inside the ``with`` block are removed at its end."""
    rules, float_lr = dict(_FALLBACKS), set(_FLOAT_LR)
    try:
        yield
    finally:
        _FALLBACKS.clear()
        _FALLBACKS.update(rules)
        _FLOAT_LR.clear()
        _FLOAT_LR.update(float_lr)


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
