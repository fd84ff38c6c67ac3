"""Options as data: str-Enums, per-group configurations and per-layer plans.

A param group of a Kronecker optimizer is a plain dict (torch.optim convention,
and what checkpoints hold). It is validated **once** into a frozen configuration
(:class:`GroupConfig`, :class:`SINGDConfig`, :class:`KFACConfig`) that the step
reads; the optimizer re-validates a group only when its dict was edited (a value
replaced), so edits take effect at the next access and are checked like the
constructor's arguments. ``lr`` and ``lr_cov`` are read live from the dict at every
use, so learning-rate schedulers work without re-validation.

Each supported layer gets a :class:`LayerPlan` when it is registered: the
structures, dtypes and dimensions of its factors and the statistics options it
is accumulated with, resolved from its group and its adapter in one place.

The options with a fixed set of values are ``str`` Enums (:class:`KFACApprox`,
:class:`LossAverage`, :class:`Fallback`); plain strings are accepted everywhere
and param groups keep the plain string (checkpoints hold plain values only).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from singd.structures import Dense, Structure

E = TypeVar("E", bound=enum.Enum)

#: Param-group keys read live at every use (schedulers change them).
LIVE_KEYS = frozenset({"params", "lr", "lr_cov"})


class KFACApprox(str, enum.Enum):
    """KFAC approximation for weight-sharing layers (spec §4)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class LossAverage(str, enum.Enum):
    """How the loss averages its terms (sets the scale of the gradient statistics).

    ``None`` (not a member) means a summed loss.
    """

    BATCH = "batch"
    BATCH_SEQUENCE = "batch+sequence"


class Fallback(str, enum.Enum):
    """The built-in first-order rules for parameters without Kronecker factors.

    ``None`` (not a member) leaves them untrained; more rules can be registered
    with :func:`singd.optim.fallback.register_fallback`.
    """

    ADAMW = "adamw"
    SGD = "sgd"


def parse_option(cls: type[E], value: Any, what: str, *, allow_none: bool = False) -> E | None:
    """A member of the str-Enum ``cls`` from itself or its value; a clear error otherwise."""
    if value is None and allow_none:
        return None
    try:
        return cls(value)
    except ValueError:
        valid = [m.value for m in cls] + ([None] if allow_none else [])
        raise ValueError(f"Invalid {what} {value!r}. Valid: {tuple(valid)}.") from None


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float32`` → ``"float32"`` (None stays None), for checkpoints."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def plain(value: Any) -> Any:
    """An Enum member → its plain value (for param-group dicts and checkpoints)."""
    return value.value if isinstance(value, enum.Enum) else value


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """The validated options of one param group that every Kronecker optimizer has.

    ``lr`` and ``lr_cov`` are not here: they are read live from the group.
    """

    momentum: float
    damping: float
    weight_decay: float
    T: int
    loss_average: LossAverage | None
    kfac_approx: KFACApprox
    kl_clip: float | None
    fallback: str | None
    fallback_betas: tuple[float, float]
    fallback_eps: float

    @classmethod
    def common_fields(cls, group: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of :class:`GroupConfig` from an already validated group."""
        return {
            "momentum": group["momentum"],
            "damping": group["damping"],
            "weight_decay": group["weight_decay"],
            "T": group["T"],
            "loss_average": parse_option(
                LossAverage, group["loss_average"], "loss_average", allow_none=True
            ),
            "kfac_approx": parse_option(KFACApprox, group["kfac_approx"], "kfac_approx"),
            "kl_clip": group["kl_clip"],
            "fallback": plain(group["fallback"]),
            "fallback_betas": tuple(group["fallback_betas"]),
            "fallback_eps": group["fallback_eps"],
        }

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> GroupConfig:
        """Build from a validated (normalised) param group."""
        return cls(**cls.common_fields(group))


@dataclasses.dataclass(frozen=True)
class SINGDConfig(GroupConfig):
    """SINGD's options of a param group."""

    alpha1: float
    structures: tuple[Structure, Structure]
    kfac_like: bool
    preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None]
    normalize_lr_cov: bool

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> SINGDConfig:
        return cls(
            **cls.common_fields(group),
            alpha1=group["alpha1"],
            structures=tuple(group["structures"]),
            kfac_like=group["kfac_like"],
            preconditioner_dtype=tuple(group["preconditioner_dtype"]),
            normalize_lr_cov=group["normalize_lr_cov"],
        )


@dataclasses.dataclass(frozen=True)
class KFACConfig(GroupConfig):
    """KFAC's options of a param group."""

    factor_dtype: torch.dtype | None
    inverse_dtype: torch.dtype

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> KFACConfig:
        return cls(
            **cls.common_fields(group),
            factor_dtype=group["factor_dtype"],
            inverse_dtype=group["inverse_dtype"],
        )


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one layer's preconditioner is built: resolved once, at registration.

    ``structure_K`` already honours the adapter's required input structure (e.g.
    diagonal for embeddings). A dtype of None means the weight's dtype at the time
    the state is allocated, and the state goes to the weight's device then: a model
    may be moved after the optimizer is built (as ``accelerate.prepare`` does).
    """

    structure_K: Structure
    structure_C: Structure
    dtype_K: torch.dtype | None
    dtype_C: torch.dtype | None
    d_K: int
    d_C: int
    kfac_approx: KFACApprox
    loss_average: LossAverage | None

    @property
    def approx(self) -> str:
        """The KFAC approximation as the plain string the adapters take."""
        return self.kfac_approx.value

    @property
    def loss_average_name(self) -> str | None:
        """The loss average as the plain value the adapters take."""
        return None if self.loss_average is None else self.loss_average.value


def dense_plan(config: GroupConfig, dims: tuple[int, int], dtype: torch.dtype | None) -> LayerPlan:
    """A plan with dense factors of one dtype (KFAC)."""
    return LayerPlan(
        structure_K=Dense(),
        structure_C=Dense(),
        dtype_K=dtype,
        dtype_C=dtype,
        d_K=dims[0],
        d_C=dims[1],
        kfac_approx=config.kfac_approx,
        loss_average=config.loss_average,
    )
