r"""SINGD: Structured Inverse-Free Natural Gradient Descent (Lin et al., ICML 2024).

Per supported layer with weight :math:`W \in \mathbb{R}^{d_o \times d_i}` (bias as an
extra column), SINGD keeps Kronecker factors :math:`K \in \hat{\mathcal L}_K` and
:math:`C \in \hat{\mathcal L}_C` with :math:`K K^\top \otimes C C^\top \approx F^{-1}`,
updated every ``T`` steps without any matrix inversion (see
:mod:`singd.functional.factors`), and preconditions every step with
:math:`C C^\top \nabla W K K^\top` (:mod:`singd.functional.precondition`).

Paper symbol ↔ argument: β₂ ``lr``, α₂ ``momentum``, λ ``damping``, α₁ ``alpha1``,
γ ``weight_decay``, T ``T``, β₁ ``lr_cov``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from singd.config import LayerPlan, SINGDConfig, dtype_name
from singd.functional import FactorState
from singd.optim.base import KroneckerOptimizer, Layer
from singd.optim.options import KroneckerOptions, shared_options, split_options
from singd.optim.validation import BOUNDS, check_bool, check_factor_step, parse_dtype
from singd.preconditioners import SINGDPreconditioner
from singd.preconditioners.singd import input_curvature, output_curvature
from singd.structures import StructuredMatrix, parse_structure

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SINGD", "input_curvature", "output_curvature"]


@shared_options()
class SINGD(KroneckerOptimizer):
    r"""Structured inverse-free natural gradient descent (IKFAC, INGD and SINGD).

    Works like any ``torch.optim`` optimizer::

        optim = SINGD(model, kfac_like=False, structures=("dense", "diagonal"))
        optim.zero_grad(); loss_func(model(X), y).backward(); optim.step()

    Args:
        model: The model, or its ``DistributedDataParallel`` wrapper; its layers are
            found by their module type.
        params: None (every trainable weight/bias of a supported layer), a list of
            parameters, or param-group dicts overriding any keyword below except
            ``model``, ``warn_unsupported``, ``init_grad_scale``, ``grad_scaler`` and
            ``distributed``.
        <shared options>
        alpha1: α₁, Riemannian momentum of the factors (forced to 0 with
            ``kfac_like=True``).
        structures: Structures of (K, m_K) and (C, m_C): names such as ``"dense"``,
            ``"diagonal"`` (see :func:`singd.structures.available_structures`) or
            :class:`~singd.structures.Structure` specs.
        kfac_like: True gives IKFAC (no Riemannian momentum, constant damping).
        preconditioner_dtype: Dtypes of (K, m_K, H_K) and (C, m_C, H_C); None
            uses the weight's dtype.
        normalize_lr_cov: Normalised steps on the factors:
            :math:`\beta_1 / \max(1, \|m\|_\infty)`, with momentum scaled by 1−α₁.
        <constructor options>

    Raises:
        ValueError: For invalid hyper-parameters or names (the message lists the
            valid choices) and for a layer split across param groups.
        TypeError: If ``model`` is wrapped in ``DataParallel`` or FSDP.
    """

    _STATE_KEY = "singd"
    config_cls = SINGDConfig
    preconditioner_cls = SINGDPreconditioner

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        *,
        alpha1: float = 0.5,
        structures: tuple[str, str] = ("dense", "dense"),
        kfac_like: bool = False,
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
        normalize_lr_cov: bool = False,
        **options: Unpack[KroneckerOptions],
    ) -> None:
        defaults, constructor = split_options(SINGD, options)
        defaults.update(
            alpha1=alpha1,
            structures=structures,
            kfac_like=kfac_like,
            preconditioner_dtype=preconditioner_dtype,
            normalize_lr_cov=normalize_lr_cov,
        )
        super().__init__(model, params, defaults, **constructor)

    # --- hyper-parameters ----------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        BOUNDS["alpha1"].check(group["alpha1"])
        structures = group["structures"]
        if not isinstance(structures, (tuple, list)) or len(structures) != 2:
            raise ValueError(
                f"structures must be a pair (structure of K, structure of C), got {structures!r}."
            )
        group["structures"] = tuple(parse_structure(s) for s in structures)
        dtypes = group["preconditioner_dtype"]
        if dtypes is None or isinstance(dtypes, (str, torch.dtype)) or len(dtypes) != 2:
            raise ValueError(
                f"preconditioner_dtype must be a pair (dtype of K, dtype of C), got {dtypes!r}."
            )
        group["preconditioner_dtype"] = tuple(
            parse_dtype(d, "preconditioner_dtype") for d in dtypes
        )
        for flag in ("kfac_like", "normalize_lr_cov"):
            check_bool(flag, group[flag])
        if group["kfac_like"] and group["alpha1"] != 0:
            warnings.warn(
                f"kfac_like=True (IKFAC) has no Riemannian momentum; alpha1={group['alpha1']} "
                "is set to 0.",
                stacklevel=4,
            )
            group["alpha1"] = 0.0
        if not callable(group["lr_cov"]):  # (a schedule is checked at each refresh)
            self._check_factor_step(group, group["lr_cov"])

    @staticmethod
    def _check_factor_step(group: Mapping[str, Any], lr_cov: float) -> None:
        check_factor_step(
            lr_cov,
            group["damping"],
            group["alpha1"],
            kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
        )

    def _lr_cov(self, index: int) -> float:
        lr_cov = super()._lr_cov(index)
        group = self.param_groups[index]
        if callable(group["lr_cov"]):  # (a number was checked with the group)
            self._check_factor_step(group, lr_cov)
        return lr_cov

    def _plan(self, layer: Layer, config: SINGDConfig) -> LayerPlan:
        d_K, d_C = layer.adapter.factor_dims()
        structure_K, structure_C = config.structures
        dtype_K, dtype_C = config.preconditioner_dtype
        return LayerPlan(
            structure_K=layer.adapter.input_structure or structure_K,
            structure_C=structure_C,
            dtype_K=dtype_K,
            dtype_C=dtype_C,
            d_K=d_K,
            d_C=d_C,
            kfac_approx=config.kfac_approx,
            loss_average=config.loss_average,
        )

    def _singd(self, layer_name: str) -> SINGDPreconditioner:
        return self._preconditioners[layer_name]  # type: ignore[return-value]

    def _allocated(self) -> dict[str, FactorState]:
        states = {n: self._singd(n).state for n in self._preconditioners}
        return {n: s for n, s in states.items() if s is not None}

    # Read-only views under the published implementation's attribute names.
    @property
    def Ks(self) -> dict[str, StructuredMatrix]:
        """K of every layer with factors, by module name (published attribute name)."""
        return {name: state.K for name, state in self._allocated().items()}

    @property
    def Cs(self) -> dict[str, StructuredMatrix]:
        """C of every layer with factors, by module name (published attribute name)."""
        return {name: state.C for name, state in self._allocated().items()}

    @property
    def m_Ks(self) -> dict[str, StructuredMatrix]:
        """m_K where it exists (α₁ ≠ 0), by module name (published attribute name)."""
        return {n: s.m_K for n, s in self._allocated().items() if s.m_K is not None}

    @property
    def m_Cs(self) -> dict[str, StructuredMatrix]:
        """m_C where it exists (α₁ ≠ 0), by module name (published attribute name)."""
        return {n: s.m_C for n, s in self._allocated().items() if s.m_C is not None}

    def factors(self, layer_name: str) -> FactorState:
        """The factors (K, C, m_K, m_C) of a layer, created as K = I, C = I on first use."""
        return self._singd(layer_name).factors()

    # --- checkpointing ---------------------------------------------------------------
    def _plain_group(self, group: dict[str, Any]) -> dict[str, Any]:
        plain = super()._plain_group(group)
        plain["structures"] = tuple(str(s) for s in group["structures"])
        plain["preconditioner_dtype"] = tuple(dtype_name(d) for d in group["preconditioner_dtype"])
        return plain

    def _restore_group(self, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        saved = super()._restore_group(saved, current)
        if tuple(parse_structure(s) for s in saved["structures"]) != current["structures"]:
            raise ValueError(
                f"The checkpoint uses structures {saved['structures']}, this optimizer "
                f"{tuple(str(s) for s in current['structures'])}."
            )
        return saved
