"""One table of optimizer configurations that the torch.optim contract tests run over.

In the spirit of torch's ``OptimizerInfo``: each :class:`OptimizerCase` is an optimizer
class with keyword arguments and the contracts it ``supports``; a contract test asks
for :func:`cases` of its flag and runs over every case that has it. Adding a case adds
it to every contract (the flags keep the default run inside the CI budget, and mark
the contracts a configuration cannot meet exactly, with the reason beside the flag).

Flags:

* ``checkpoint``: ``state_dict`` → ``torch.load(weights_only=True)`` → a fresh
  optimizer resumes bit-identically;
* ``closure``: ``step(closure)`` equals the explicit loop, bit for bit;
* ``param_groups``: two groups equal two separate optimizers, bit for bit;
* ``scheduler``: an LR scheduler drives ``lr`` (lr = 0 freezes every parameter);
* ``grad_scaler``: a ``GradScaler`` with changing power-of-two scales tracks the
  unscaled run;
* ``accumulation``: micro-batches whose losses are scaled to the big batch's mean equal
  the big batch (INGD-family only: it is invariant to U ← nU, G ← G/n; IKFAC and KFAC are
  not, since their damping is not scaled with the statistics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD

CONTRACTS = frozenset(
    {"checkpoint", "closure", "param_groups", "scheduler", "grad_scaler", "accumulation"}
)

#: Hyper-parameters every case starts from (a few steps on the test CNN move far enough).
BASE: dict[str, Any] = {"lr": 5e-3, "damping": 1e-3, "weight_decay": 1e-2, "lr_cov": 1e-2}


@dataclasses.dataclass(frozen=True)
class OptimizerCase:
    """An optimizer configuration and the contracts it is tested against."""

    id: str
    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any]
    supports: frozenset[str] = CONTRACTS

    def make(self, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer for ``model`` (``BASE``, then the case's, then ``overrides``)."""
        return self.cls(model, **{**BASE, **self.kwargs, **overrides})  # type: ignore[call-arg]

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments (``BASE`` and the case's), e.g. for param groups."""
        return {**BASE, **self.kwargs}


def _flags(*names: str) -> frozenset[str]:
    return frozenset(names)


# Which case runs which contract: every case runs the checkpoint round trip; the other
# contracts exercise code that does not depend on the structure or the approximation,
# so each runs on a few cases that differ where it matters (CI time, module docstring).
OPTIMIZER_CASES: list[OptimizerCase] = [
    OptimizerCase("ingd", SINGD, {"T": 1}),
    OptimizerCase(
        "ikfac",
        SINGD,
        {"T": 1, "kfac_like": True, "alpha1": 0.0},
        _flags("checkpoint", "closure", "grad_scaler"),
    ),
    OptimizerCase(
        "singd-diagonal-T2",
        SINGD,
        {"T": 2, "structures": ("diagonal", "diagonal")},
        _flags("checkpoint", "param_groups", "accumulation"),
    ),
    OptimizerCase(
        "singd-block-toeplitz",
        SINGD,
        {"T": 1, "structures": ("block_diagonal(5)", "tril_toeplitz"), "alpha1": 0.3},
        _flags("checkpoint", "grad_scaler", "accumulation"),
    ),
    OptimizerCase(
        "singd-hierarchical-normalized",
        SINGD,
        {
            "T": 1,
            "structures": ("hierarchical(3, 4)", "triu_top_left(3)"),
            "normalize_lr_cov": True,
        },
        _flags("checkpoint", "param_groups"),
    ),
    OptimizerCase(
        "singd-reduce-kl-clip-sgd-fallback",
        SINGD,
        {"T": 3, "kfac_approx": "reduce", "kl_clip": 1e-3, "fallback": "sgd", "momentum": 0.5},
        _flags("checkpoint", "closure", "scheduler", "grad_scaler"),
    ),
    # A summed loss: the micro-batch losses are not means, so no accumulation case.
    OptimizerCase(
        "singd-summed-loss-schedule",
        SINGD,
        {"T": 1, "loss_average": None, "lr": 1e-3, "lr_cov": lambda t: 1e-3 * (1 + t % 2)},
        _flags("checkpoint", "scheduler", "grad_scaler"),
    ),
    # KFAC and IKFAC are not invariant to U ← nU, G ← G/n (no accumulation case).
    OptimizerCase(
        "kfac",
        KFAC,
        {"T": 1},
        _flags("checkpoint", "closure", "param_groups", "scheduler", "grad_scaler"),
    ),
    OptimizerCase(
        "kfac-reduce-float64-T2",
        KFAC,
        {"T": 2, "kfac_approx": "reduce", "factor_dtype": torch.float64, "lr_cov": 0.1},
        _flags("checkpoint"),
    ),
]


def cases(contract: str) -> list[Any]:
    """``pytest.param`` of every case that supports ``contract``, with its id."""
    if contract not in CONTRACTS:
        raise ValueError(f"Unknown contract {contract!r}. Valid: {sorted(CONTRACTS)}.")
    return [pytest.param(c, id=c.id) for c in OPTIMIZER_CASES if contract in c.supports]
