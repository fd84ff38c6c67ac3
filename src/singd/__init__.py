"""singd: Structured Inverse-Free Natural Gradient Descent for PyTorch.

>>> from singd import SINGD
>>> # optim = SINGD(model, structures=("dense", "diagonal"))
"""

from singd.layers import LayerAdapter, register_adapter
from singd.optim import KFAC, SINGD
from singd.structures import Structure, StructuredMatrix, parse_structure, register_structure

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "SINGD",
    "LayerAdapter",
    "Structure",
    "StructuredMatrix",
    "__version__",
    "parse_structure",
    "register_adapter",
    "register_structure",
]
