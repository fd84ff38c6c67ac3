"""The optimizers the ``singd`` command compares, their tuned defaults, and a factory.

Names (``--optimizer``):

* ``sgd`` — ``torch.optim.SGD`` with heavy-ball momentum;
* ``adamw`` — ``torch.optim.AdamW``;
* ``kfac`` — :class:`singd.KFAC` (explicit damped inverses);
* ``ikfac`` — :class:`singd.SINGD` with ``kfac_like=True`` and dense factors;
* ``ingd`` — :class:`singd.SINGD` with dense factors (INGD = SINGD-dense);
* ``singd`` — :class:`singd.SINGD` with a structure for K and C (``--structure``).

The defaults in :data:`DEFAULT_HYPERPARAMETERS` were tuned a little on the digits
CNN (a grid over lr, damping, lr_cov and T; see ``docs/cli.md``). Structures are
found through :func:`singd.structures.parse_structure`, so structures registered
later show up without changes here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from singd import KFAC, SINGD
from singd.optim.validation import BOUNDS, KFAC_BOUNDS, check_factor_step
from singd.structures import available_structures, parse_structure

#: Names accepted by :func:`build_optimizer`.
OPTIMIZERS = ("sgd", "adamw", "kfac", "ikfac", "ingd", "singd")

#: Display names.
LABELS = {
    "sgd": "SGD",
    "adamw": "AdamW",
    "kfac": "KFAC",
    "ikfac": "IKFAC",
    "ingd": "INGD",
    "singd": "SINGD",
}

#: The hyper-parameters each optimizer takes (paper symbols: lr β₂, momentum α₂,
#: weight_decay γ, damping λ, lr_cov β₁, alpha1 α₁, T the refresh interval).
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "weight_decay"),
    "adamw": ("lr", "weight_decay"),
    "kfac": ("lr", "momentum", "weight_decay", "damping", "lr_cov", "T"),
    "ikfac": ("lr", "momentum", "weight_decay", "damping", "lr_cov", "T"),
    "ingd": ("lr", "momentum", "weight_decay", "damping", "lr_cov", "alpha1", "T"),
    "singd": ("lr", "momentum", "weight_decay", "damping", "lr_cov", "alpha1", "T"),
}

#: Defaults tuned on the digits CNN (6 epochs at batch 64, float32, by test accuracy; the
#: grids are in ``docs/cli.md``) and checked in bfloat16. The Kronecker methods share one
#: setting, so that only method and structure differ; it is within about one point of test
#: accuracy of each one's best (SINGD-diagonal: 2.4 points): λ = 0.1 and
#: β₁ = 0.1 (with K = C = I at the start, a large β₁ lets the factors adapt within the first
#: hundred steps), and T = 5, which costs less than T = 1 at about the same accuracy.
_KRONECKER_DEFAULTS = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "damping": 0.1,
    "lr_cov": 0.1,
    "T": 5,
}
DEFAULT_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "adamw": {"lr": 3e-3, "weight_decay": 1e-2},
    "kfac": dict(_KRONECKER_DEFAULTS),
    "ikfac": dict(_KRONECKER_DEFAULTS),
    "ingd": {**_KRONECKER_DEFAULTS, "alpha1": 0.5},
    "singd": {**_KRONECKER_DEFAULTS, "alpha1": 0.5},
}

#: The structures the paper and the published code name.
PUBLISHED_STRUCTURES = (
    "dense",
    "diagonal",
    "block30diagonal",
    "hierarchical15_15",
    "triltoeplitz",
    "triutoeplitz",
)

#: The cheap structures ``singd compare`` runs by default (those that exist).
CHEAP_STRUCTURES = ("diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer configuration: a name, a structure (SINGD only) and hyper-parameters.

    Attributes:
        name: One of :data:`OPTIMIZERS`.
        structure: Structure of K and C for ``singd`` (any string
            :func:`~singd.structures.parse_structure` reads); None otherwise.
        hyperparameters: Overrides of :data:`DEFAULT_HYPERPARAMETERS`.
    """

    name: str
    structure: str | None = None
    hyperparameters: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.name!r}. Valid: {', '.join(OPTIMIZERS)}.")
        if self.name == "singd":
            if self.structure is None:
                raise ValueError("The singd optimizer needs a structure (e.g. 'diagonal').")
            parse_structure(self.structure)
        elif self.structure is not None:
            raise ValueError(
                f"Only the singd optimizer takes a structure; {self.name} does not "
                f"(got {self.structure!r})."
            )
        unknown = set(self.hyperparameters) - set(HYPERPARAMETERS[self.name])
        if unknown:
            raise ValueError(
                f"{self.name} does not take {', '.join(sorted(unknown))}; it takes "
                f"{', '.join(HYPERPARAMETERS[self.name])}."
            )
        self._check_bounds()

    def _check_bounds(self) -> None:
        """The library's bounds (:mod:`singd.optim.validation`), before anything trains."""
        hp = self.resolved()
        table = KFAC_BOUNDS if self.name == "kfac" else BOUNDS
        for key, value in hp.items():
            table[key].check(value)
        if self.name in ("ikfac", "ingd", "singd"):
            check_factor_step(
                hp["lr_cov"],
                hp["damping"],
                hp.get("alpha1", 0.0),
                kfac_like=self.name == "ikfac",
                normalize_lr_cov=False,
            )

    @property
    def label(self) -> str:
        """Display name, e.g. ``"SINGD-diagonal"`` or ``"AdamW"``."""
        if self.structure is None:
            return LABELS[self.name]
        return f"{LABELS[self.name]}-{parse_structure(self.structure)}"

    def resolved(self) -> dict[str, float]:
        """The defaults of :data:`DEFAULT_HYPERPARAMETERS` updated by the overrides."""
        return {**DEFAULT_HYPERPARAMETERS[self.name], **self.hyperparameters}


def build_optimizer(
    spec: OptimizerSpec,
    model: nn.Module,
    *,
    preconditioner_dtype: torch.dtype | None = None,
    loss_average: str | None = "batch",
) -> Optimizer:
    """Create the optimizer ``spec`` describes for ``model``.

    Args:
        spec: The configuration.
        model: The model; the Kronecker methods train its ``Linear``/``Conv`` layers.
        preconditioner_dtype: Dtype of the Kronecker factors (None: the weights'
            dtype). ``bf16-autocast`` training passes ``torch.bfloat16``.
        loss_average: How the loss averages (``"batch"`` for classification of
            images, ``"batch+sequence"`` for per-token losses averaged over tokens).

    Returns:
        The optimizer.
    """
    hp = spec.resolved()
    if spec.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
        )
    if spec.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    common: dict[str, Any] = {
        "lr": hp["lr"],
        "momentum": hp["momentum"],
        "weight_decay": hp["weight_decay"],
        "damping": hp["damping"],
        "lr_cov": hp["lr_cov"],
        "T": int(hp["T"]),
        "loss_average": loss_average,
    }
    if spec.name == "kfac":
        return KFAC(model, factor_dtype=preconditioner_dtype, **common)
    dtypes = (preconditioner_dtype, preconditioner_dtype)
    if spec.name == "ikfac":
        return SINGD(model, kfac_like=True, alpha1=0.0, preconditioner_dtype=dtypes, **common)
    structure = "dense" if spec.name == "ingd" else spec.structure
    if structure is None:
        raise ValueError(f"Optimizer {spec.name!r} needs a structure (e.g. singd:diagonal).")
    return SINGD(
        model,
        alpha1=hp["alpha1"],
        structures=(structure, structure),
        preconditioner_dtype=dtypes,
        **common,
    )


def usable_structures(candidates: Iterable[str]) -> list[str]:
    """The candidates that :func:`~singd.structures.parse_structure` accepts, one per spec.

    Names that do not parse (a structure not implemented yet) are skipped; two
    names for the same spec (``"block30diagonal"``, ``"block_diagonal(30)"``) keep
    the first.
    """
    seen: set[str] = set()
    usable: list[str] = []
    for name in candidates:
        try:
            canonical = str(parse_structure(name))
        except (ValueError, TypeError):
            continue
        if canonical not in seen:
            seen.add(canonical)
            usable.append(name)
    return usable


def every_structure() -> list[str]:
    """Every structure that can be named now: the published names, then the registry's.

    Registry entries with arguments (``"block_diagonal(block_size)"``) are tried
    with their defaults (``"block_diagonal()"``); entries whose arguments have no
    defaults are skipped (name them explicitly instead).
    """
    registered: list[str] = []
    for entry in available_structures():
        registered.append(entry)
        call = re.fullmatch(r"\s*(\w+)\s*\(.*\)\s*", entry)
        if call:
            registered.append(f"{call.group(1)}()")
    return usable_structures([*PUBLISHED_STRUCTURES, *registered])


def compare_specs(
    structures: Iterable[str] | None = None, T: int | None = None
) -> list[OptimizerSpec]:
    """The optimizer matrix of ``singd compare``: SGD, AdamW, KFAC, IKFAC, INGD, SINGD-*.

    Args:
        structures: SINGD structures to include; default :data:`CHEAP_STRUCTURES`
            (those that exist).
        T: Refresh interval of every Kronecker method (default: theirs).
    """
    chosen = usable_structures(CHEAP_STRUCTURES if structures is None else structures)
    refresh = {} if T is None else {"T": T}
    return [
        OptimizerSpec("sgd"),
        OptimizerSpec("adamw"),
        OptimizerSpec("kfac", hyperparameters=refresh),
        OptimizerSpec("ikfac", hyperparameters=refresh),
        OptimizerSpec("ingd", hyperparameters=refresh),
        *(OptimizerSpec("singd", s, refresh) for s in chosen),
    ]
