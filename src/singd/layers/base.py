r"""Layer adapters: how one layer type yields its Kronecker statistics.

Every supported layer computes :math:`y = W \tilde x` per *shared position* (a
sequence element, an output pixel), with :math:`W \in \mathbb{R}^{d_o\times d_i}`
(bias appended as the last column when present). An adapter turns the layer's input
and output gradient into the common *weight-sharing format*
``[batch, shared, features]`` (curvlinops' convention); from there
:func:`input_matrix` and :func:`grad_output_matrix` apply KFAC-expand/reduce and the
loss-average scaling of spec §4 in one place for every layer type:

* expand: rows are all ``B·R`` (batch, position) pairs;
  :math:`A = [x \,|\, 1] / \sqrt{BR}`, :math:`G_m = g \cdot \sqrt{n_\text{loss}}`;
* reduce: inputs are **averaged** and output gradients **summed** over the ``R``
  shared positions; :math:`A = [\bar x \,|\, 1]/\sqrt{B}`;

with :math:`n_\text{loss}` = 1 (``loss_average=None``), ``B`` (``"batch"``), or
``B·R`` (``"batch+sequence"``). Then :math:`U = A^\top A` and :math:`G = G_m^\top G_m`.

A new layer type is an adapter subclass plus :func:`register_adapter` (the class; the
optimizer binds one instance to each layer of that type, ``LinearAdapter(module)``).
A :class:`Layer` is a layer the optimizer found: its name in the model and its adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import Tensor, nn

from singd.structures import Structure, _linalg

KFAC_APPROXIMATIONS = ("expand", "reduce")
LOSS_AVERAGES = (None, "batch", "batch+sequence")


#: The module type an adapter handles.
M = TypeVar("M", bound=nn.Module)


class LayerAdapter(ABC, Generic[M]):
    """How one layer (a module of type ``M``) exposes its parameters and statistics to
    Kronecker optimizers.

    An adapter is bound to its module: ``LinearAdapter(linear)``. Subclasses are
    registered by class (:func:`register_adapter`); the optimizer makes one adapter per
    supported module of the model when it discovers the layers.

    Args:
        module: The layer this adapter handles.
    """

    #: A structure the input-side factor K must have whatever the param group asks
    #: for (e.g. diagonal for embeddings, whose K spans the vocabulary), or None.
    input_structure: Structure | None = None

    #: The attributes of the module that its statistics read besides the shapes of the
    #: parameters, the input and the output gradient (a convolution's stride, padding,
    #: …; none for a Linear layer), or None: the statistics cannot be batched over
    #: layers. The default :meth:`statistics_signature` reads them.
    statistics_attributes: ClassVar[tuple[str, ...] | None] = None

    def statistics_signature(self, x: Tensor) -> Hashable | None:
        """Everything of this layer that the statistics of a pass with input ``x``
        depend on besides the adapter class and the shapes and dtypes of the parameters,
        the input and the output gradient; None: they are formed one layer at a time
        (an adapter may say so for passes where that is cheaper, as convolutions do for
        large inputs on CPUs).

        The statistics of layers with equal signatures (and equal shapes and dtypes) may
        be formed in one batched computation: :func:`torch.vmap` of the statistics of
        the *first* layer of the group over the stacked inputs and output gradients
        (:mod:`singd.optim.pending`). So the signature must name everything the
        adapter's statistics methods read from the module, and those methods must be
        vmap-safe (under :func:`singd.structures._linalg.tracing`: no ``out=`` into
        views, no in-place writes into new tensors). Default: the values of
        :attr:`statistics_attributes` (None if that is None).
        """
        names = self.statistics_attributes
        if names is None:
            return None
        return tuple(getattr(self.module, name) for name in names)

    def __init__(self, module: M) -> None:
        self.module = module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.module).__name__})"

    def check(self) -> None:
        """Raise a clear error if the module cannot be handled (called at registration)."""

    def parameters(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        """The ``(weight, bias)`` pair that the Kronecker factors precondition.

        Default: ``module.weight`` and ``module.bias`` (None if the module has none).
        """
        weight = cast(nn.Parameter, self.module.weight)
        return weight, cast("nn.Parameter | None", getattr(self.module, "bias", None))

    @abstractmethod
    def factor_dims(self) -> tuple[int, int]:
        """``(d_K, d_C)``: input-side dimension (bias included) and output-side dimension."""

    @abstractmethod
    def shared_inputs(self, x: Tensor) -> Tensor:
        """The layer input in weight-sharing format ``[B, R, d_in]`` (no bias column)."""

    @abstractmethod
    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        """The output gradient in weight-sharing format ``[B, R, d_o]``."""

    def expanded_input_matrix(self, x: Tensor) -> Tensor:
        r"""KFAC-expand's :math:`A = [x \,|\, 1] / \sqrt{BR}`, ``[B·R, d_K]``.

        Override when the weight-sharing format is costly to copy (convolutions).
        """
        return scaled_with_bias_column(self, self.shared_inputs(x).flatten(0, 1))

    def input_diagonal(self, x: Tensor, approx: str) -> Tensor:
        r""":math:`\operatorname{diag}(A^\top A)`, all a diagonal K needs from the input.

        Sums of squares over the weight-sharing format, without forming :math:`A`
        (no bias-column copy); adapters override it where even that format is
        costly (convolutions sum over the batch before gathering patches,
        embeddings count tokens).
        """
        if approx == "expand":
            diag = self.shared_inputs(x).square().mean((0, 1))  # (a mean: one division less)
        else:
            reduced = self.reduced_inputs(x)
            diag = reduced.square().sum(0) / reduced.shape[0]
        if self.parameters()[1] is not None:
            diag = pad_bias_entry(diag)
        return diag

    def grad_output_squares(self, g: Tensor) -> tuple[Tensor, int, int]:
        r"""Per output feature, :math:`\sum g^2` over the batch and the shared positions,
        and the numbers of samples B and positions R (the diagonal of
        :math:`G_m^\top G_m` before the loss-average scaling). By default through the
        weight-sharing format; adapters override it with a direct reduction (no
        reshaping or transposing views: accelerators pay per operation)."""
        shared = self.shared_grad_outputs(g)
        return shared.square().sum((0, 1)), shared.shape[0], shared.shape[1]

    def reduced_inputs(self, x: Tensor) -> Tensor:
        """The input averaged over shared positions, ``[B, d_in]`` (KFAC-reduce).

        Override when the average is cheaper than the weight-sharing format
        (convolutions average patches without unfolding).
        """
        return self.shared_inputs(x).mean(1)

    def grad_matrix(self) -> Tensor:
        r"""The gradient as a ``[d_o, d_K]`` matrix :math:`[\nabla W \,|\, \nabla b]`.

        The weight gradient is flattened to ``[d_o, -1]``; a missing bias gradient
        counts as zero.
        """
        weight, bias = self.parameters()
        assert weight.grad is not None
        g = weight.grad.flatten(1)
        if bias is None:
            return g
        bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        return torch.cat([g, bias_grad.unsqueeze(1).to(g.dtype)], dim=1)

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`: ``[d_o, d_K]`` back to ``[weight, bias]`` shapes."""
        weight, bias = self.parameters()
        if bias is None:
            return [mat.reshape(weight.shape)]
        return [mat[:, :-1].reshape(weight.shape), mat[:, -1]]

    # --- equal layers as one stack (singd.preconditioners.joint) --------------------------
    @classmethod
    def stacked_grad_matrices(cls, adapters: Sequence[LayerAdapter[Any]]) -> Tensor:
        r"""The :meth:`grad_matrix` of equal layers of this class (same weight shape and
        bias; every parameter with a gradient) as one ``[L, d_o, d_K]`` stack.

        The default layout (weight flattened beside the bias) takes a few operations for
        any number of layers; an adapter with its own :meth:`grad_matrix` gets one call
        of it per layer, unless it overrides this method too.
        """
        if cls.grad_matrix is not LayerAdapter.grad_matrix:
            return torch.stack([adapter.grad_matrix() for adapter in adapters])
        weights = torch.stack([a.parameters()[0].grad for a in adapters])  # type: ignore[misc]
        G = weights.flatten(2)
        if adapters[0].parameters()[1] is not None:
            biases = torch.stack([a.parameters()[1].grad for a in adapters])  # type: ignore[misc, union-attr]
            G = torch.cat([G, biases.unsqueeze(2).to(G.dtype)], dim=2)
        return G

    @classmethod
    def split_stacked(cls, N: Tensor, adapters: Sequence[LayerAdapter[Any]]) -> list[list[Tensor]]:
        """Inverse of :meth:`stacked_grad_matrices`: ``[L, d_o, d_K]`` back to each layer's
        ``[weight, bias]`` shapes (views where the layout allows)."""
        if cls.split_matrix is not LayerAdapter.split_matrix:
            return [a.split_matrix(n) for a, n in zip(adapters, N.unbind(0), strict=True)]
        weight, bias = adapters[0].parameters()
        d_in = N.shape[2] - int(bias is not None)
        weights = N[:, :, :d_in].unflatten(2, weight.shape[1:]).unbind(0)
        if bias is None:
            return [[w] for w in weights]
        return [[w, b] for w, b in zip(weights, N[:, :, d_in].unbind(0), strict=True)]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A supported layer: its name in the model and its (bound) adapter."""

    name: str
    adapter: LayerAdapter[Any]

    @property
    def module(self) -> nn.Module:
        """The layer's module."""
        return self.adapter.module

    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter."""
        return self.adapter.parameters()[0]

    @property
    def params(self) -> list[nn.Parameter]:
        """Weight and bias (if any), in the order of :meth:`LayerAdapter.split_matrix`."""
        return [p for p in self.adapter.parameters() if p is not None]

    def trainable_params(self) -> list[nn.Parameter]:
        """The parameters of :attr:`params` that require gradients."""
        return [p for p in self.params if p.requires_grad]


def pad_bias_entry(diag: Tensor) -> Tensor:
    """``[diag | 1]``: the bias column of :math:`A` contributes 1 to diag(AᵀA).

    One operation (``constant_pad_nd``) instead of a ``new_ones`` and a ``cat``.
    """
    return nn.functional.pad(diag, (0, 1), value=1.0)


def input_matrix(adapter: LayerAdapter[Any], x: Tensor, approx: str) -> Tensor:
    """The processed input :math:`A` ``[rows, d_K]`` for ``U = AᵀA`` (module docstring)."""
    if approx == "expand":
        return adapter.expanded_input_matrix(x)
    return scaled_with_bias_column(adapter, adapter.reduced_inputs(x))


def scaled_with_bias_column(adapter: LayerAdapter[Any], a: Tensor) -> Tensor:
    """``[a | 1] / √rows`` written in one pass into a preallocated matrix (no concat copy)."""
    rows, features = a.shape
    root = math.sqrt(rows)  # divided, not multiplied by 1/√rows: the published rounding
    bias = adapter.parameters()[1] is not None
    if not _linalg.splits_work(a) or _linalg.tracing():  # (tracing: no out= into views)
        # accelerators: two operations instead of six
        scaled = a / root
        return nn.functional.pad(scaled, (0, 1), value=1.0 / root) if bias else scaled
    out = a.new_empty(rows, features + bias)
    torch.div(a, root, out=out[:, :features])
    if bias:
        out[:, features].fill_(1.0).div_(root)
    return out


def grad_output_matrix(
    adapter: LayerAdapter[Any], g: Tensor, approx: str, loss_average: str | None
) -> Tensor:
    """The processed output gradient :math:`G_m` ``[rows, d_o]`` for ``G = G_mᵀG_m``."""
    shared = adapter.shared_grad_outputs(g)
    scale = math.sqrt(num_loss_terms(shared, loss_average))
    if approx == "reduce":
        return shared.sum(1) * scale
    if (
        shared.stride(1) == 1
        and shared.shape[1] > 1
        and (not _linalg.splits_work(shared) or _linalg.tracing())
    ):
        # accelerators: one fused multiply-copy (no preallocation), same numbers
        return (shared.permute(2, 0, 1) * scale).flatten(1).T
    if shared.stride(1) == 1 and shared.shape[1] > 1:
        # Positions contiguous (a channel-first gradient, e.g. a convolution's): write
        # G_mᵀ row by row instead of transposing element by element (measured 35× faster
        # on a 32×32 feature map); same numbers, returned as a transposed view.
        out = shared.new_empty(shared.shape[2], shared.shape[0], shared.shape[1])
        torch.mul(shared.permute(2, 0, 1), scale, out=out)
        return out.flatten(1).T
    return shared.flatten(0, 1) * scale


def grad_output_diagonal(
    adapter: LayerAdapter[Any], g: Tensor, approx: str, loss_average: str | None
) -> Tensor:
    r""":math:`\operatorname{diag}(G_m^\top G_m)`, all a diagonal C needs, without forming
    :math:`G_m` (no transposed copy of convolution gradients)."""
    if approx == "expand":
        squares, batch, positions = adapter.grad_output_squares(g)
    else:
        shared = adapter.shared_grad_outputs(g)
        squares = shared.sum(1).square().sum(0)
        batch, positions = shared.shape[0], shared.shape[1]
    terms = {None: 1, "batch": batch, "batch+sequence": batch * positions}[loss_average]
    return squares * terms if terms != 1 else squares


def num_loss_terms(shared: Tensor, loss_average: str | None) -> int:
    """Loss terms of a batch in weight-sharing format ``[B, R, …]``: 1, B or B·R."""
    batch, positions = shared.shape[0], shared.shape[1]
    return {None: 1, "batch": batch, "batch+sequence": batch * positions}[loss_average]


_ADAPTERS: dict[type[nn.Module], type[LayerAdapter[Any]]] = {}
#: Adapters for classes of optional libraries, keyed by ``"module.QualName"``: matched
#: by name so that the library is never imported by singd itself.
_ADAPTERS_BY_NAME: dict[str, type[LayerAdapter[Any]]] = {}


def _checked_adapter_class(adapter: object) -> type[LayerAdapter[Any]]:
    if isinstance(adapter, LayerAdapter):
        name = type(adapter).__name__
        raise TypeError(
            f"Register the adapter class, not an instance: register_adapter(..., {name}) "
            f"rather than {name}(...); the optimizer binds one adapter to each layer."
        )
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"Expected a LayerAdapter subclass, got {adapter!r}.")
    return adapter


def register_adapter(module_type: type[M], adapter: type[LayerAdapter[M]]) -> None:
    """Make Kronecker optimizers handle ``module_type`` (and its subclasses) with
    ``adapter``, a :class:`LayerAdapter` subclass bound to each such layer as
    ``adapter(module)``.

    Raises:
        TypeError: If ``module_type`` is not an ``nn.Module`` subclass or ``adapter``
            is not a ``LayerAdapter`` subclass (an instance is refused too).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"Expected an nn.Module subclass, got {module_type!r}.")
    _ADAPTERS[module_type] = _checked_adapter_class(adapter)


def register_adapter_by_name(qualified_name: str, adapter: type[LayerAdapter[Any]]) -> None:
    """Like :func:`register_adapter` for a class named ``"package.module.ClassName"``.

    For layers of optional libraries (``transformers``' ``Conv1D``): the class is
    matched by its ``__module__`` and ``__qualname__``, so registering it imports
    nothing.
    """
    if not (isinstance(qualified_name, str) and "." in qualified_name):
        raise ValueError(
            f"Expected a dotted class name such as 'package.module.Class', got {qualified_name!r}."
        )
    _ADAPTERS_BY_NAME[qualified_name] = _checked_adapter_class(adapter)


def adapter_class(module_type: type[nn.Module]) -> type[LayerAdapter[Any]] | None:
    """The adapter class registered for the closest type in ``module_type``'s MRO, or None."""
    for cls in module_type.__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
        by_name = _ADAPTERS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if by_name is not None:
            return by_name
    return None


def find_adapter(module: nn.Module) -> LayerAdapter[Any] | None:
    """A new adapter bound to ``module`` (:func:`adapter_class` of its type), or None."""
    cls = adapter_class(type(module))
    return None if cls is None else cls(module)


@contextlib.contextmanager
def scoped_registration() -> Iterator[None]:
    """Adapters registered inside the ``with`` block are removed (and replaced ones
    restored) at its end; for tests and notebooks."""
    adapters, by_name = dict(_ADAPTERS), dict(_ADAPTERS_BY_NAME)
    try:
        yield
    finally:
        _ADAPTERS.clear()
        _ADAPTERS.update(adapters)
        _ADAPTERS_BY_NAME.clear()
        _ADAPTERS_BY_NAME.update(by_name)


def supported_layer_types() -> list[str]:
    """Names of the registered layer types."""
    names = [cls.__name__ for cls in _ADAPTERS] + list(_ADAPTERS_BY_NAME)
    return sorted(names)
