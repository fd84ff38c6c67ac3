r"""The keyword options SINGD and KFAC share: defined once, with their defaults and docs.

Both constructors take the same 16 options (learning rate, damping, refresh period,
fallback rule, distribution strategy, …). They are declared here once:

* :class:`KroneckerOptions`, a ``TypedDict`` the type checker reads
  (``**options: Unpack[KroneckerOptions]`` checks the names and types of
  ``SINGD(model, lr=…)`` statically);
* :data:`SHARED_OPTIONS`, each option's default and description.

:func:`shared_options` decorates an optimizer class whose ``__init__`` declares only
its own options: it gives ``__init__`` the full explicit signature that
``help(SINGD)`` and :func:`inspect.signature` show (``torch.optim`` style, every
keyword with its default), and writes the shared descriptions into the class
docstring. :func:`split_options` fills in the defaults at run time and separates the
param-group options (``optimizer.defaults``) from the constructor-only ones.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import torch

if TYPE_CHECKING:
    from singd.distributed import Distributor


class KroneckerOptions(TypedDict, total=False):
    """The keyword options every Kronecker optimizer takes (for the type checker)."""

    lr: float
    momentum: float
    damping: float
    weight_decay: float
    T: int
    loss_average: str | None
    lr_cov: float | Callable[[int], float]
    kfac_approx: str
    kl_clip: float | None
    fallback: str | None
    fallback_betas: tuple[float, float]
    fallback_eps: float
    warn_unsupported: bool
    init_grad_scale: float
    grad_scaler: torch.amp.GradScaler | None
    distributed: str | Distributor | None


#: ``name: (default, description)`` of every shared option, in signature order.
SHARED_OPTIONS: dict[str, tuple[Any, str]] = {
    "lr": (0.001, "β₂, the parameter learning rate."),
    "momentum": (0.9, "α₂, heavy-ball momentum of the parameter step."),
    "damping": (0.001, "λ."),
    "weight_decay": (0.0, "γ, coupled L2 term added to the preconditioned gradient."),
    "T": (10, "Refresh the Kronecker factors every ``T`` steps (when ``step % T == 0``)."),
    "loss_average": (
        "batch",
        '``None`` (summed loss), ``"batch"`` or ``"batch+sequence"``: how the loss '
        "averages, which sets the scale of the gradient statistics.",
    ),
    "lr_cov": (1e-2, "β₁, the factor step size; a float, or a callable of the step."),
    "kfac_approx": ("expand", '``"expand"`` or ``"reduce"`` for weight-sharing layers.'),
    "kl_clip": (
        None,
        r"Optional bound :math:`c` on the quadratic-model KL change of a step: the "
        r"natural gradients of a param group are scaled by :math:`\nu = \min(1, "
        r"\sqrt{c / (\beta_2^2 \sum_l \langle \nabla W_l, \Delta_l\rangle)})` (as KFAC "
        "implementations offer). None: no clipping.",
    ),
    "fallback": (
        "adamw",
        "Rule for every trainable parameter without Kronecker factors (norm layers, raw "
        'parameters, shared/tied weights, layers whose hooks never fire): ``"adamw"`` '
        '(default; decoupled ``weight_decay``), ``"sgd"`` (heavy-ball ``momentum``, '
        "coupled ``weight_decay``) or ``None`` (leave them to another optimizer, as the "
        "published SINGD). It uses its param group's ``lr``, so LR schedulers drive it "
        "too; put those parameters in their own group for a different learning rate.",
    ),
    "fallback_betas": ((0.9, 0.999), "AdamW's (β₁, β₂) for the fallback."),
    "fallback_eps": (1e-8, "AdamW's ε for the fallback."),
    "warn_unsupported": (True, "Warn about trainable parameters the optimizer does not train."),
    "init_grad_scale": (
        1.0,
        "Gradient scale assumed before the first step (set it to your GradScaler's initial scale).",
    ),
    "grad_scaler": (
        None,
        "The ``torch.amp.GradScaler`` of the training loop, if any. It supplies "
        "``init_grad_scale``, and it is required when you call "
        "``scaler.unscale_(optimizer)`` before ``scaler.step`` (to clip).",
    ),
    "distributed": (
        "auto",
        'Data-parallel strategy (:mod:`singd.distributed`): ``"auto"`` (replicated if '
        'the model is DDP-wrapped or several ranks run, else none), ``"replicated"``, '
        '``"sharded"`` (each rank owns the factors of some layers; for large dense '
        "factors), ``None`` (no communication), or a "
        ":class:`~singd.distributed.Distributor`.",
    ),
}

#: The options that configure the optimizer itself, not a param group.
CONSTRUCTOR_OPTIONS = ("warn_unsupported", "init_grad_scale", "grad_scaler", "distributed")

if set(SHARED_OPTIONS) != set(KroneckerOptions.__annotations__):  # (one table, checked)
    raise RuntimeError("SHARED_OPTIONS and KroneckerOptions must name the same options.")

_SHARED_MARK = "<shared options>"
_CONSTRUCTOR_MARK = "<constructor options>"

C = TypeVar("C", bound=type)


def _annotation(name: str) -> str:
    hint = KroneckerOptions.__annotations__[name]
    return str(getattr(hint, "__forward_arg__", hint))  # (a string: postponed annotations)


def _documented(docstring: str, mark: str, names: list[str], docs: Mapping[str, str]) -> str:
    """``docstring`` with the line holding ``mark`` replaced by Google-style entries."""
    match = re.search(rf"^( *){re.escape(mark)}\n", docstring, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"The docstring has no {mark!r} line.")
    indent = match.group(1)
    entries = [
        textwrap.fill(
            f"{name}: {docs.get(name, SHARED_OPTIONS[name][1])}",
            width=88,
            initial_indent=indent,
            subsequent_indent=indent + "    ",
            break_on_hyphens=False,
        )
        + "\n"
        for name in names
    ]
    return docstring[: match.start()] + "".join(entries) + docstring[match.end() :]


def shared_options(docs: Mapping[str, str] | None = None) -> Callable[[C], C]:
    """Class decorator: the shared options in ``__init__``'s signature and the docstring.

    ``__init__`` declares ``model``, ``params``, then its own keyword-only options and
    ``**options: Unpack[KroneckerOptions]``. The decorated ``__init__`` shows the
    shared param-group options after ``params``, then its own, then the constructor
    options. The class docstring's ``<shared options>`` and ``<constructor options>``
    lines become their ``Args`` entries.

    Args:
        docs: Descriptions that differ for this optimizer, by option name.
    """
    docs = dict(docs or {})
    unknown = set(docs) - set(SHARED_OPTIONS)
    if unknown:
        raise ValueError(f"No shared options named {sorted(unknown)}.")

    def decorate(cls: C) -> C:
        init = cls.__init__  # type: ignore[misc]
        signature = inspect.signature(init)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        head = [p for p in own if p.kind is not p.KEYWORD_ONLY]
        keywords = [p for p in own if p.kind is p.KEYWORD_ONLY]
        group = [n for n in SHARED_OPTIONS if n not in CONSTRUCTOR_OPTIONS]

        def parameter(name: str) -> inspect.Parameter:
            default = SHARED_OPTIONS[name][0]
            kind = inspect.Parameter.KEYWORD_ONLY
            return inspect.Parameter(name, kind, default=default, annotation=_annotation(name))

        parameters = [*head, *map(parameter, group), *keywords]
        parameters += map(parameter, CONSTRUCTOR_OPTIONS)
        init.__signature__ = signature.replace(parameters=parameters)
        doc = _documented(cls.__doc__ or "", _SHARED_MARK, group, docs)
        cls.__doc__ = _documented(doc, _CONSTRUCTOR_MARK, list(CONSTRUCTOR_OPTIONS), docs)
        return cls

    return decorate


def split_options(owner: type, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(param-group options, constructor options)``: ``options`` with the defaults of
    :data:`SHARED_OPTIONS` filled in.

    Raises:
        TypeError: For a name that is no option of ``owner`` (listing the valid ones).
    """
    unknown = [name for name in options if name not in SHARED_OPTIONS]
    if unknown:
        valid = [n for n in inspect.signature(owner).parameters if n not in ("model", "params")]
        raise TypeError(
            f"{owner.__name__}() got unexpected keyword argument(s) "
            f"{', '.join(map(repr, unknown))}; its options are: {', '.join(valid)}."
        )
    values = {name: options.get(name, default) for name, (default, _) in SHARED_OPTIONS.items()}
    constructor = {name: values.pop(name) for name in CONSTRUCTOR_OPTIONS}
    return values, constructor
