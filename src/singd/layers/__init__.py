"""Layer adapters: how each layer type yields its Kronecker statistics (registry)."""

from torch import nn

from singd.layers.base import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    LayerAdapter,
    find_adapter,
    grad_output_diagonal,
    grad_output_matrix,
    input_matrix,
    register_adapter,
    scoped_registration,
    supported_layer_types,
)
from singd.layers.conv import ConvAdapter
from singd.layers.embedding import EmbeddingAdapter
from singd.layers.linear import LinearAdapter

register_adapter(nn.Linear, LinearAdapter())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_adapter(_conv, ConvAdapter())
register_adapter(nn.Embedding, EmbeddingAdapter())

__all__ = [
    "KFAC_APPROXIMATIONS",
    "LOSS_AVERAGES",
    "ConvAdapter",
    "EmbeddingAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "find_adapter",
    "grad_output_diagonal",
    "grad_output_matrix",
    "input_matrix",
    "register_adapter",
    "scoped_registration",
    "supported_layer_types",
]
