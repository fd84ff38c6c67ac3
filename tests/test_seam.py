"""The distribution seam is sealed: strategies see the optimizer only through the protocol."""

from __future__ import annotations

import ast
from pathlib import Path

from torch import nn

import singd.distributed
from singd import KFAC, SINGD
from singd.distributed import DistributedOptimizer, KroneckerLayer

DISTRIBUTED = Path(singd.distributed.__file__).parent


def test_no_module_of_distributed_imports_the_optimizers_or_their_privates() -> None:
    for path in sorted(DISTRIBUTED.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("singd.optim"), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("singd.optim") for a in node.names), path.name
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                # private members of the objects it is handed (optimizer, optim, layer, ...)
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else ""
                assert name not in {"optimizer", "optim", "layer"}, (path.name, node.attr)


def test_the_optimizers_implement_the_protocol() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for cls in (SINGD, KFAC):
        optim = cls(model)
        assert isinstance(optim, DistributedOptimizer)
        assert list(optim.layers) == ["0", "2"]
        assert all(isinstance(layer, KroneckerLayer) for layer in optim.layers.values())
        assert optim.param_name(model[2].bias) == "2.bias"
    optim = SINGD(model, structures=("diagonal", "dense"))
    assert optim.factor_sizes(optim.layers["0"]) == (
        4,
        16,
    )  # diagonal K over 3 inputs + bias, dense C over 4 outputs
