"""Layer adapters: how each layer type yields its Kronecker statistics (registry).

Adapter classes are registered per module type (:func:`register_adapter`, or
:func:`register_adapter_by_name` for optional libraries); :func:`find_adapter` binds
the registered class to a module, and a :class:`Layer` is such a bound adapter with
the module's name in the model.
"""

from torch import nn

from singd.layers.base import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    Layer,
    LayerAdapter,
    adapter_class,
    find_adapter,
    grad_output_diagonal,
    grad_output_matrix,
    input_matrix,
    register_adapter,
    register_adapter_by_name,
    scoped_registration,
    supported_layer_types,
)
from singd.layers.conv import ConvAdapter
from singd.layers.embedding import EmbeddingAdapter
from singd.layers.linear import LinearAdapter
from singd.layers.transformers_conv1d import CONV1D_CLASS, TransformersConv1DAdapter

register_adapter(nn.Linear, LinearAdapter)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_adapter(_conv, ConvAdapter)
register_adapter(nn.Embedding, EmbeddingAdapter)
register_adapter_by_name(CONV1D_CLASS, TransformersConv1DAdapter)  # GPT-2 (optional)

__all__ = [
    "KFAC_APPROXIMATIONS",
    "LOSS_AVERAGES",
    "ConvAdapter",
    "EmbeddingAdapter",
    "Layer",
    "LayerAdapter",
    "LinearAdapter",
    "TransformersConv1DAdapter",
    "adapter_class",
    "find_adapter",
    "grad_output_diagonal",
    "grad_output_matrix",
    "input_matrix",
    "register_adapter",
    "register_adapter_by_name",
    "scoped_registration",
    "supported_layer_types",
]
