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

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from singd.distributed import Distributor
from singd.distributed.statistics import input_statistic, output_statistic, sandwich
from singd.functional import (
    FactorHyperparams,
    FactorState,
    natural_gradient,
    update_factors,
)
from singd.layers import grad_output_diagonal, grad_output_matrix, input_matrix
from singd.optim.base import KroneckerOptimizer, Layer
from singd.optim.validation import (
    BOUNDS,
    check_bool,
    check_factor_step,
    dtype_name,
    parse_dtype,
    resolve_lr_cov,
)
from singd.structures import StructuredMatrix, parse_structure

_FACTOR_NAMES = ("K", "C", "m_K", "m_C")


def input_curvature(K: StructuredMatrix, layer: Layer, x: Tensor, approx: str) -> StructuredMatrix:
    r""":math:`H_K = \hat\Pi(K^\top A^\top A K)` from the layer input.

    A diagonal K (``inner_needs_only_diagonal``) needs only
    :math:`\operatorname{diag}(A^\top A)`, which adapters compute without forming
    :math:`A` (unfolded convolution patches, one-hot embedding inputs).
    """
    if x.is_floating_point():  # (embedding inputs are indices)
        x = x.to(K.dtype)
    if K.inner_needs_only_diagonal:
        return K.from_inner_diagonal(layer.adapter.input_diagonal(layer.module, x, approx))
    return K.from_inner(input_matrix(layer.adapter, layer.module, x, approx).T)


def output_curvature(
    C: StructuredMatrix,
    layer: Layer,
    g: Tensor,
    approx: str,
    loss_average: str | None,
    previous_scale: float = 1.0,
) -> StructuredMatrix:
    r""":math:`H_C = \hat\Pi(C^\top G_m^\top G_m C) / s_{t-1}` from the output gradient.

    A diagonal C (``inner_needs_only_diagonal``) needs only
    :math:`\operatorname{diag}(G_m^\top G_m)`, computed without forming :math:`G_m`.
    :math:`s_{t-1}` is the previous gradient scale.
    """
    if C.inner_needs_only_diagonal:
        diag = grad_output_diagonal(layer.adapter, layer.module, g, approx, loss_average)
        return C.from_inner_diagonal(diag / previous_scale if previous_scale != 1.0 else diag)
    Gm = grad_output_matrix(layer.adapter, layer.module, g, approx, loss_average)
    if previous_scale != 1.0:
        Gm = Gm / math.sqrt(previous_scale)
    return C.from_inner(Gm.T)


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
            ``model``, ``warn_unsupported`` and ``init_grad_scale``.
        lr: β₂, the parameter learning rate.
        momentum: α₂, heavy-ball momentum of the parameter step.
        damping: λ.
        alpha1: α₁, Riemannian momentum of the factors (forced to 0 with
            ``kfac_like=True``).
        weight_decay: γ, coupled L2 term added to the preconditioned gradient.
        T: Refresh the factors every ``T`` steps (when ``step % T == 0``).
        loss_average: ``None`` (summed loss), ``"batch"`` or ``"batch+sequence"``:
            how the loss averages, which sets the scale of the gradient statistics.
        lr_cov: β₁, the factor step size; a float, or a callable of the step.
        structures: Structures of (K, m_K) and (C, m_C): names such as ``"dense"``,
            ``"diagonal"`` (see :func:`singd.structures.available_structures`) or
            :class:`~singd.structures.Structure` specs.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers.
        warn_unsupported: Warn about trainable parameters SINGD does not train.
        kfac_like: True gives IKFAC (no Riemannian momentum, constant damping).
        preconditioner_dtype: Dtypes of (K, m_K, H_K) and (C, m_C, H_C); None
            uses the weight's dtype.
        init_grad_scale: Gradient scale assumed before the first step (set it to
            your GradScaler's initial scale).
        normalize_lr_cov: Normalised steps on the factors:
            :math:`\beta_1 / \max(1, \|m\|_\infty)`, with momentum scaled by 1−α₁.

        kl_clip: Optional bound :math:`c` on the quadratic-model KL change of a
            step: the natural gradients of a param group are scaled by
            :math:`\nu = \min(1, \sqrt{c / (\beta_2^2 \sum_l \langle \nabla W_l,
            \Delta_l\rangle)})` (as KFAC implementations offer). None: no clipping.
        grad_scaler: The ``torch.amp.GradScaler`` of the training loop, if any. It
            supplies ``init_grad_scale``, and it is required when you call
            ``scaler.unscale_(optimizer)`` before ``scaler.step`` (to clip).
        fallback: Rule for every trainable parameter without Kronecker factors
            (norm layers, raw parameters, shared/tied weights, layers whose hooks
            never fire): ``"adamw"`` (default; decoupled ``weight_decay``),
            ``"sgd"`` (heavy-ball ``momentum``, coupled ``weight_decay``) or
            ``None`` (leave them to another optimizer, as the published SINGD).
            It uses its param group's ``lr``, so LR schedulers drive it too; put
            those parameters in their own group for a different learning rate.
        fallback_betas: AdamW's (β₁, β₂) for the fallback.
        fallback_eps: AdamW's ε for the fallback.
        distributed: Data-parallel strategy (:mod:`singd.distributed`):
            ``"auto"`` (replicated if the model is DDP-wrapped or several ranks run,
            else none), ``"replicated"``, ``"sharded"`` (each rank owns the factors
            of some layers; for large dense factors), ``None`` (no communication), or
            a :class:`~singd.distributed.Distributor`.

    Raises:
        ValueError: For invalid hyper-parameters or names (the message lists the
            valid choices) and for a layer split across param groups.
        TypeError: If ``model`` is wrapped in ``DataParallel`` or FSDP.
    """

    _STATE_KEY = "singd"

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        lr: float = 0.001,
        momentum: float = 0.9,
        damping: float = 0.001,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[str, str] = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        kl_clip: float | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        fallback: str | None = "adamw",
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        distributed: str | Distributor | None = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "alpha1": alpha1,
            "weight_decay": weight_decay,
            "T": T,
            "loss_average": loss_average,
            "lr_cov": lr_cov,
            "structures": structures,
            "kfac_approx": kfac_approx,
            "kfac_like": kfac_like,
            "preconditioner_dtype": preconditioner_dtype,
            "normalize_lr_cov": normalize_lr_cov,
            "kl_clip": kl_clip,
            "fallback": fallback,
            "fallback_betas": fallback_betas,
            "fallback_eps": fallback_eps,
        }
        self._factors: dict[str, FactorState] = {}
        self._H_K: dict[str, StructuredMatrix] = {}
        self._H_C: dict[str, StructuredMatrix] = {}
        super().__init__(
            model,
            params,
            defaults,
            warn_unsupported=warn_unsupported,
            init_grad_scale=init_grad_scale,
            grad_scaler=grad_scaler,
            distributed=distributed,
        )

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

    @staticmethod
    def _hyperparams(group: Mapping[str, Any], step: int) -> FactorHyperparams:
        lr_cov = resolve_lr_cov(group["lr_cov"], step)
        if callable(group["lr_cov"]):
            SINGD._check_factor_step(group, lr_cov)
        return FactorHyperparams(
            lr_cov=lr_cov,
            damping=group["damping"],
            alpha1=group["alpha1"],
            kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
        )

    # --- factor state ----------------------------------------------------------------
    def _factor_dtypes(self, layer: Layer) -> tuple[torch.dtype, torch.dtype]:
        dtype_K, dtype_C = self.group_of(layer.name)["preconditioner_dtype"]
        return dtype_K or layer.weight.dtype, dtype_C or layer.weight.dtype

    # Read-only views under the published implementation's attribute names.
    @property
    def Ks(self) -> dict[str, StructuredMatrix]:
        """K of every layer with factors, by module name (published attribute name)."""
        return {name: state.K for name, state in self._factors.items()}

    @property
    def Cs(self) -> dict[str, StructuredMatrix]:
        """C of every layer with factors, by module name (published attribute name)."""
        return {name: state.C for name, state in self._factors.items()}

    @property
    def m_Ks(self) -> dict[str, StructuredMatrix]:
        """m_K where it exists (α₁ ≠ 0), by module name (published attribute name)."""
        return {n: s.m_K for n, s in self._factors.items() if s.m_K is not None}

    @property
    def m_Cs(self) -> dict[str, StructuredMatrix]:
        """m_C where it exists (α₁ ≠ 0), by module name (published attribute name)."""
        return {n: s.m_C for n, s in self._factors.items() if s.m_C is not None}

    def factors(self, layer_name: str) -> FactorState:
        """The factors (K, C, m_K, m_C) of a layer, created as K = I, C = I on first use."""
        state = self._factors.get(layer_name)
        if state is None:
            layer = self._layers[layer_name]
            group = self.group_of(layer_name)
            structure_K, structure_C = group["structures"]
            structure_K = layer.adapter.input_structure or structure_K
            dtype_K, dtype_C = self._factor_dtypes(layer)
            d_K, d_C = layer.adapter.factor_dims(layer.module)
            device = layer.weight.device
            state = FactorState(
                K=structure_K.eye(d_K, dtype=dtype_K, device=device),
                C=structure_C.eye(d_C, dtype=dtype_C, device=device),
            )
            if group["alpha1"] != 0:
                state.m_K = structure_K.zeros(d_K, dtype=dtype_K, device=device)
                state.m_C = structure_C.zeros(d_C, dtype=dtype_C, device=device)
            self._factors[layer_name] = state
        return state

    # --- KroneckerOptimizer interface ------------------------------------------------
    def _accumulate(self, layer: Layer, group: dict[str, Any], x: Tensor, g: Tensor) -> None:
        approx = group["kfac_approx"]
        dtype_K, dtype_C = self._factor_dtypes(layer)
        g = g.to(dtype_C)
        # The hook divides by √s_{t−1} (singd.amp): squares carry 1/s_{t−1}.
        previous_scale = self._scales.previous(self.steps)
        if self._distributor.replicates_factors:
            state = self.factors(layer.name)
            H_K = input_curvature(state.K, layer, x, approx)
            H_C = output_curvature(state.C, layer, g, approx, group["loss_average"], previous_scale)
        else:  # sharded: the owner forms H from the reduced U, G (singd.distributed.statistics)
            structure_K, structure_C = group["structures"]
            structure_K = layer.adapter.input_structure or structure_K
            x = x.to(dtype_K) if x.is_floating_point() else x
            H_K = input_statistic(structure_K, layer.adapter, layer.module, x, approx)
            H_C = output_statistic(
                structure_C,
                layer.adapter,
                layer.module,
                g,
                approx,
                group["loss_average"],
                previous_scale,
            )
        for store, H in ((self._H_K, H_K), (self._H_C, H_C)):
            if layer.name in store:
                store[layer.name].add_(H)
            else:
                store[layer.name] = H

    def _has_statistics(self, layer: Layer) -> bool:
        return layer.name in self._H_K

    def _forget_layer(self, layer: Layer) -> None:
        for store in (self._factors, self._H_K, self._H_C):
            store.pop(layer.name, None)

    def _describe_layer(self, layer: Layer) -> tuple[str, int]:
        state = self._factors.get(layer.name)
        if state is None:  # not allocated yet: count what the first step will allocate
            group = self.group_of(layer.name)
            d_K, d_C = layer.adapter.factor_dims(layer.module)
            structure_K = layer.adapter.input_structure or group["structures"][0]
            dtype_K, dtype_C = self._factor_dtypes(layer)
            copies = 2 if group["alpha1"] != 0 else 1
            nbytes = copies * (
                structure_K.num_stored(d_K) * dtype_K.itemsize
                + group["structures"][1].num_stored(d_C) * dtype_C.itemsize
            )
            text = f"K: {structure_K} {d_K}, C: {group['structures'][1]} {d_C}"
            return text, nbytes
        factors = [f for f in (state.K, state.C, state.m_K, state.m_C) if f is not None]
        text = (
            f"K: {state.K.structure} {state.K.dim} {dtype_name(state.K.dtype)}, "
            f"C: {state.C.structure} {state.C.dim} {dtype_name(state.C.dtype)}"
        )
        return text, sum(f.nbytes() for f in factors)

    def _clear_statistics(self) -> None:
        self._H_K.clear()
        self._H_C.clear()

    def _statistics(self, layer: Layer) -> tuple[list[Tensor], list[Tensor]]:
        return (
            list(self._H_K[layer.name].tensors().values()),
            list(self._H_C[layer.name].tensors().values()),
        )

    def _drop_statistics(self, layer: Layer) -> None:
        self._H_K.pop(layer.name, None)
        self._H_C.pop(layer.name, None)

    def _refresh(
        self, layer: Layer, group: dict[str, Any], h_c_unscale: float
    ) -> tuple[Tensor, Callable[[], None]]:
        H_K, H_C = self._H_K.pop(layer.name), self._H_C.pop(layer.name)
        hp = self._hyperparams(group, self.steps)
        old = self.factors(layer.name)
        if not self._distributor.replicates_factors:  # reduced U, G → H_K, H_C
            H_K, H_C = sandwich(old.K, H_K), sandwich(old.C, H_C)
        new = update_factors(old, H_K, H_C, hp, h_c_unscale)
        self._factors[layer.name] = new
        # inf/NaN anywhere in H or m reaches K_new = K − β₁ K m and C_new: one sum
        # per stored tensor of the new factors detects it (sums propagate inf/NaN).
        sums = [t.sum(dtype=torch.float32) for f in (new.K, new.C) for t in f.tensors().values()]
        finite = torch.isfinite(torch.stack(sums).sum())

        def undo() -> None:
            self._factors[layer.name] = old

        return finite, undo

    def _precondition(self, layer: Layer, G: Tensor) -> Tensor:
        state = self.factors(layer.name)
        return natural_gradient(state.K, state.C, G)

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

    def _layer_state(self, layer: Layer) -> dict[str, Tensor]:
        state = self._factors.get(layer.name)
        if state is None:
            return {}
        out: dict[str, Tensor] = {}
        for factor_name in _FACTOR_NAMES:
            factor = getattr(state, factor_name)
            if factor is not None:
                for tensor_name, t in factor.tensors().items():
                    out[f"{factor_name}.{tensor_name}"] = t
        return out

    def _load_layer_state(self, layer: Layer, state: Mapping[str, Tensor]) -> None:
        self._factors.pop(layer.name, None)
        if not state:
            return
        current = self.factors(layer.name)  # right structures, dims, dtypes and device
        for factor_name in _FACTOR_NAMES:
            factor = getattr(current, factor_name)
            prefix = f"{factor_name}."
            saved = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if factor is None:
                if saved:
                    setattr(
                        current,
                        factor_name,
                        self._restore_factor(getattr(current, factor_name[-1]), saved),
                    )
                continue
            setattr(current, factor_name, self._restore_factor(factor, saved))

    @staticmethod
    def _restore_factor(like: StructuredMatrix, saved: Mapping[str, Tensor]) -> StructuredMatrix:
        tensors = {k: v.to(device=like.device, dtype=like.dtype).clone() for k, v in saved.items()}
        return like.structure.from_tensors(like.dim, tensors)
