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

Beyond the contracts, the same table feeds the other optimizer-configuration suites:

* ``oracle``: parameters, buffers and factors follow the float64 dense oracle of
  ``tests/reference`` (``tests/test_oracle.py``) on the case's ``problem``, on every
  device (so the GPU runs the same trajectories as the CPU);
* ``distributed``: 2 gloo ranks equal one process on the full batch
  (``tests/test_distributed.py``);
* ``amp``: inf/NaN gradients and statistics skip the whole step and training goes on
  (``tests/test_amp.py``).

A suite adds its own base hyper-parameters for its problem (``BASE`` here for the
contracts on ``tests.helpers.net``; the oracle and distributed suites keep theirs
beside their models); a case holds what makes the configuration (structures,
approximation, refresh period, flags).
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
#: Every suite a case can be in (module docstring).
SUITES = CONTRACTS | {"oracle", "distributed", "amp"}
#: The oracle suite's problems (models of ``tests/test_oracle.py``).
ORACLE_PROBLEMS = frozenset(
    {"mlp", "mlp_repeated", "seq", "conv_strided", "conv_same", "conv_modes", "conv_repeated"}
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
    #: The oracle suite's model (a key of ``ORACLE_PROBLEMS``) and input scale.
    problem: str | None = None
    scale: float = 1.0

    def make(self, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer for ``model`` (``BASE``, then the case's, then ``overrides``)."""
        return self.cls(model, **{**BASE, **self.kwargs, **overrides})  # type: ignore[call-arg]

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments (``BASE`` and the case's), e.g. for param groups."""
        return {**BASE, **self.kwargs}


def _flags(*names: str) -> frozenset[str]:
    return frozenset(names)


def oracle_schedule(step: int) -> float:
    """A callable β₁ that changes every step (catches an off-by-one step index)."""
    return 0.02 * (1 + step)


ORACLE = _flags("oracle")


# Which case runs which contract: every case runs the checkpoint round trip; the other
# contracts exercise code that does not depend on the structure or the approximation,
# so each runs on a few cases that differ where it matters (CI time, module docstring).
OPTIMIZER_CASES: list[OptimizerCase] = [
    OptimizerCase("ingd", SINGD, {"T": 1}, CONTRACTS | {"distributed", "amp"}),
    OptimizerCase(
        "ikfac",
        SINGD,
        {"T": 1, "kfac_like": True, "alpha1": 0.0},
        _flags("checkpoint", "closure", "grad_scaler", "distributed"),
    ),
    OptimizerCase(
        "singd-diagonal-T2",
        SINGD,
        {"T": 2, "structures": ("diagonal", "diagonal")},
        _flags("checkpoint", "param_groups", "accumulation", "amp"),
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
        _flags("checkpoint", "closure", "param_groups", "scheduler", "grad_scaler", "amp"),
    ),
    OptimizerCase(
        "kfac-reduce-float64-T2",
        KFAC,
        {"T": 2, "kfac_approx": "reduce", "factor_dtype": torch.float64, "lr_cov": 0.1},
        _flags("checkpoint"),
    ),
    # --- data parallelism (2 gloo ranks; the suite adds lr, momentum, lr_cov for its net)
    OptimizerCase("ingd-reduce", SINGD, {"kfac_approx": "reduce"}, _flags("distributed")),
    # diagonal K (the input_diagonal path), block-diagonal C, refresh every other step
    OptimizerCase(
        "singd-diagonal-K-T2",
        SINGD,
        {"T": 2, "structures": ("diagonal", "block_diagonal(3)")},
        _flags("distributed"),
    ),
    # the other way round: structured K, diagonal C
    OptimizerCase(
        "singd-diagonal-C",
        SINGD,
        {"structures": ("block_diagonal(4)", "diagonal")},
        _flags("distributed"),
    ),
    OptimizerCase("kfac-damped", KFAC, {"damping": 1e-2, "lr_cov": 0.5}, _flags("distributed")),
    # --- the float64 oracle: every structure, approximation and loss average on MLP,
    # sequence and convolution problems (module docstring)
    OptimizerCase("ikfac-mlp", SINGD, {"kfac_like": True, "alpha1": 0.0}, ORACLE, problem="mlp"),
    # equal layers: refreshed and preconditioned as one stack (every structure pair)
    OptimizerCase("ingd-mlp_repeated", SINGD, {"T": 1}, ORACLE, problem="mlp_repeated"),
    OptimizerCase(
        "ikfac-mlp_repeated-T2",
        SINGD,
        {"T": 2, "kfac_like": True, "alpha1": 0.0},
        ORACLE,
        problem="mlp_repeated",
    ),
    OptimizerCase(
        "singd-mlp_repeated-block-hierarchical-normalize",
        SINGD,
        {
            "structures": ("block_diagonal(3)", "hierarchical(1, 2)"),
            "normalize_lr_cov": True,
            "lr_cov": 0.3,
            "damping": 4.0,  # (λ·I dominates m: ‖m‖∞ > 1, the normalisation acts)
        },
        ORACLE,
        problem="mlp_repeated",
    ),
    OptimizerCase(
        "singd-mlp_repeated-toeplitz-rank",
        SINGD,
        {"structures": ("triu_toeplitz", "tril_bottom_right(2)"), "alpha1": 0.3},
        ORACLE,
        problem="mlp_repeated",
    ),
    OptimizerCase(
        "singd-mlp_repeated-dense-diagonal",
        SINGD,
        {"structures": ("dense", "diagonal")},
        ORACLE,
        problem="mlp_repeated",
    ),
    OptimizerCase("ingd-mlp-a0", SINGD, {"alpha1": 0.0}, ORACLE, problem="mlp"),
    OptimizerCase("ingd-mlp-T3", SINGD, {"T": 3}, ORACLE, problem="mlp"),
    OptimizerCase(
        "ikfac-mlp-T3-nomomentum-wd",
        SINGD,
        {"kfac_like": True, "alpha1": 0.0, "T": 3, "momentum": 0.0, "weight_decay": 0.1},
        ORACLE,
        problem="mlp",
    ),
    OptimizerCase(
        "ingd-seq-expand-batch+sequence",
        SINGD,
        {"loss_average": "batch+sequence"},
        ORACLE,
        problem="seq",
    ),
    OptimizerCase("ingd-seq-reduce-batch", SINGD, {"kfac_approx": "reduce"}, ORACLE, problem="seq"),
    # A summed loss over 12 positions makes H_C large: smaller β₁, β₂ keep β₁‖m‖ < 1.
    OptimizerCase(
        "ikfac-seq-expand-sum",
        SINGD,
        {"kfac_like": True, "alpha1": 0.0, "loss_average": None, "lr_cov": 0.005, "lr": 0.01},
        ORACLE,
        problem="seq",
    ),
    OptimizerCase(
        "ikfac-seq-reduce-batch+sequence",
        SINGD,
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "kfac_approx": "reduce",
            "loss_average": "batch+sequence",
        },
        ORACLE,
        problem="seq",
    ),
    OptimizerCase("ingd-conv_strided-expand-T3", SINGD, {"T": 3}, ORACLE, problem="conv_strided"),
    OptimizerCase(
        "ingd-conv_strided-reduce", SINGD, {"kfac_approx": "reduce"}, ORACLE, problem="conv_strided"
    ),
    OptimizerCase(
        "ikfac-conv_strided-expand-sum",
        SINGD,
        {"kfac_like": True, "alpha1": 0.0, "loss_average": None},
        ORACLE,
        problem="conv_strided",
    ),
    OptimizerCase(
        "ingd-conv_same-expand-batch+sequence",
        SINGD,
        {"loss_average": "batch+sequence"},
        ORACLE,
        problem="conv_same",
    ),
    OptimizerCase(
        "ikfac-conv_same-reduce",
        SINGD,
        {"kfac_like": True, "alpha1": 0.0, "kfac_approx": "reduce"},
        ORACLE,
        problem="conv_same",
    ),
    OptimizerCase(
        "ingd-mlp-normalize",
        SINGD,
        {"normalize_lr_cov": True, "lr_cov": 0.3},
        ORACLE,
        problem="mlp",
        scale=4.0,
    ),
    OptimizerCase(
        "ikfac-seq-normalize",
        SINGD,
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "normalize_lr_cov": True,
            "lr_cov": 0.3,
            "loss_average": None,
        },
        ORACLE,
        problem="seq",
        scale=4.0,
    ),
    OptimizerCase("ingd-conv_modes-expand-T3", SINGD, {"T": 3}, ORACLE, problem="conv_modes"),
    OptimizerCase(
        "ikfac-conv_modes-reduce-sum",
        SINGD,
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "kfac_approx": "reduce",
            "loss_average": None,
            "lr": 0.01,
        },
        ORACLE,
        problem="conv_modes",
    ),
    OptimizerCase(
        "singd-conv_strided-diag-dense-expand",
        SINGD,
        {"structures": ("diagonal", "dense")},
        ORACLE,
        problem="conv_strided",
    ),
    OptimizerCase(
        "singd-conv_modes-diag-diag-batch+sequence",
        SINGD,
        {"structures": ("diagonal", "diagonal"), "loss_average": "batch+sequence"},
        ORACLE,
        problem="conv_modes",
    ),
    # Structures beyond dense/diagonal (spec §3); K is non-symmetric after one step, so
    # Π̂(KᵀK) ≠ Π̂(KKᵀ) shows (spec §9 A1).
    OptimizerCase(
        "singd-seq-block-block",
        SINGD,
        {"structures": ("block_diagonal(2)", "block_diagonal(3)")},
        ORACLE,
        problem="seq",
    ),
    OptimizerCase(
        "singd-mlp-hierarchical",
        SINGD,
        {"structures": ("hierarchical(2, 1)", "hierarchical(1, 2)")},
        ORACLE,
        problem="mlp",
    ),
    OptimizerCase(
        "ikfac-seq-toeplitz",
        SINGD,
        {"kfac_like": True, "alpha1": 0.0, "structures": ("tril_toeplitz", "triu_toeplitz")},
        ORACLE,
        problem="seq",
    ),
    OptimizerCase(
        "singd-mlp-rank-k-triangular",
        SINGD,
        {"structures": ("tril_top_left(2)", "triu_bottom_right(1)")},
        ORACLE,
        problem="mlp",
    ),
    OptimizerCase(
        "singd-seq-rank-k-triangular-normalize",
        SINGD,
        {
            "structures": ("tril_bottom_right(1)", "triu_top_left(2)"),
            "normalize_lr_cov": True,
            "lr_cov": 0.3,
        },
        ORACLE,
        problem="seq",
        scale=4.0,
    ),
    OptimizerCase(
        "singd-conv_strided-block-hierarchical-T3",
        SINGD,
        {"structures": ("block_diagonal(4)", "hierarchical(1, 2)"), "T": 3},
        ORACLE,
        problem="conv_strided",
    ),
    OptimizerCase(
        "singd-conv_modes-toeplitz-reduce",
        SINGD,
        {"structures": ("triu_toeplitz", "tril_toeplitz"), "kfac_approx": "reduce"},
        ORACLE,
        problem="conv_modes",
    ),
    OptimizerCase(
        "ingd-conv_strided-callable-lr_cov-T2",
        SINGD,
        {"lr_cov": oracle_schedule, "T": 2},
        ORACLE,
        problem="conv_strided",
    ),
    OptimizerCase(
        "singd-mlp-diag-dense", SINGD, {"structures": ("diagonal", "dense")}, ORACLE, problem="mlp"
    ),
    OptimizerCase(
        "singd-conv_same-dense-diag",
        SINGD,
        {"structures": ("dense", "diagonal"), "T": 3},
        ORACLE,
        problem="conv_same",
    ),
    OptimizerCase(
        "singd-seq-diag-diag-normalize",
        SINGD,
        {"structures": ("diagonal", "diagonal"), "normalize_lr_cov": True, "lr_cov": 0.3},
        ORACLE,
        problem="seq",
        scale=4.0,
    ),
    OptimizerCase(
        "ikfac-conv_strided-diag-diag",
        SINGD,
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "structures": ("diagonal", "diagonal"),
            "kfac_approx": "reduce",
        },
        ORACLE,
        problem="conv_strided",
    ),
    # equal convolutions: statistics formed together (and convolutions of equal shapes
    # but other geometry, which must not be)
    OptimizerCase("ingd-conv_repeated-expand", SINGD, {}, ORACLE, problem="conv_repeated"),
    OptimizerCase(
        "ikfac-conv_repeated-reduce",
        SINGD,
        {"kfac_like": True, "alpha1": 0.0, "kfac_approx": "reduce"},
        ORACLE,
        problem="conv_repeated",
    ),
    OptimizerCase(
        "singd-conv_repeated-diag-diag",
        SINGD,
        {"structures": ("diagonal", "diagonal")},
        ORACLE,
        problem="conv_repeated",
    ),
    OptimizerCase(
        "kfac-conv_repeated-reduce",
        KFAC,
        {"kfac_approx": "reduce"},
        ORACLE,
        problem="conv_repeated",
    ),
    OptimizerCase("kfac-mlp-expand-T1", KFAC, {}, ORACLE, problem="mlp"),
    OptimizerCase("kfac-mlp_repeated-T2", KFAC, {"T": 2}, ORACLE, problem="mlp_repeated"),
    OptimizerCase(
        "kfac-seq-reduce-T2-sum",
        KFAC,
        {"kfac_approx": "reduce", "T": 2, "loss_average": None},
        ORACLE,
        problem="seq",
    ),
    OptimizerCase(
        "kfac-conv_strided-expand-callable-T2",
        KFAC,
        {"lr_cov": oracle_schedule, "T": 2},
        ORACLE,
        problem="conv_strided",
    ),
    OptimizerCase(
        "kfac-conv_same-reduce-batch+sequence-T3",
        KFAC,
        {"kfac_approx": "reduce", "T": 3, "loss_average": "batch+sequence"},
        ORACLE,
        problem="conv_same",
    ),
]


def cases(suite: str, cls: type[torch.optim.Optimizer] | None = None) -> list[Any]:
    """``pytest.param`` of every case (of class ``cls``, if given) in ``suite``, with its id."""
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}. Valid: {sorted(SUITES)}.")
    return [
        pytest.param(c, id=c.id)
        for c in OPTIMIZER_CASES
        if suite in c.supports and (cls is None or c.cls is cls)
    ]
