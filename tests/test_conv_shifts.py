"""The patch matrix of "same"-size stride-1 convolutions from shifts of the flat input.

``ConvAdapter.expanded_input_matrix`` forms ``Aᵀ`` of a zero-padded, stride-1
convolution whose output is as large as its input by dividing the unpadded input,
shifted along its flattened positions, by √rows where an offset reads the input and
by ∞ where it reads padding (:func:`singd.layers.conv._flat_shifts`). Checked for 1-,
2- and 3-d convolutions (odd and even kernels, dilation, asymmetric "same" padding,
groups, with and without bias, float32 and float64, a channels-last input): the
same numbers as the padded slices (bitwise, for finite inputs) and as the
reference patches; geometries it does not cover keep the padded slices.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import singd.layers.conv as conv_module
from singd.layers import find_adapter
from tests.reference.dense_singd import conv_patches
from tests.tolerances import assert_close

SHIFTED: dict[str, tuple[type[nn.Module], dict[str, Any], tuple[int, ...]]] = {
    "2d-3x3": (nn.Conv2d, {"kernel_size": 3, "padding": 1}, (5, 7)),
    "2d-same-even-dilated": (
        nn.Conv2d,
        {"kernel_size": (2, 3), "padding": "same", "dilation": (3, 1)},
        (6, 5),
    ),
    "2d-5x5-groups-no-bias": (
        nn.Conv2d,
        {"kernel_size": 5, "padding": 2, "groups": 2, "bias": False},
        (4, 4),
    ),
    "2d-1x1": (nn.Conv2d, {"kernel_size": 1}, (3, 4)),
    "2d-2x2-input": (nn.Conv2d, {"kernel_size": 3, "padding": 1}, (2, 2)),
    "1d-same": (nn.Conv1d, {"kernel_size": 4, "padding": "same"}, (9,)),
    "3d-3x3x3": (nn.Conv3d, {"kernel_size": 3, "padding": 1}, (3, 4, 2)),
}

NOT_SHIFTED: dict[str, tuple[type[nn.Module], dict[str, Any], tuple[int, ...]]] = {
    "stride-2": (nn.Conv2d, {"kernel_size": 3, "padding": 1, "stride": 2}, (6, 6)),
    "smaller-output": (nn.Conv2d, {"kernel_size": 3}, (6, 6)),
    "reflect": (nn.Conv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, (5, 5)),
}


def _padded_slices(adapter: Any, x: torch.Tensor) -> torch.Tensor:
    """The patch matrix by the padded slices (the shifts switched off)."""
    shifts = conv_module._flat_shifts
    conv_module._flat_shifts = lambda module, x: None  # type: ignore[assignment]
    try:
        return adapter.expanded_input_matrix(x)
    finally:
        conv_module._flat_shifts = shifts


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(SHIFTED))
def test_shifted_patches_are_the_padded_ones(
    name: str, dtype: torch.dtype, channels_last: bool
) -> None:
    cls, kwargs, spatial = SHIFTED[name]
    if channels_last and cls is not nn.Conv2d:
        pytest.skip("channels-last is a 4-d memory format")
    torch.manual_seed(0)
    conv = cls(4, 4, **kwargs).to(dtype)
    x = torch.randn(3, 4, *spatial, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    adapter = find_adapter(conv)
    assert conv_module._flat_shifts(conv, x) is not None  # (the route under test)
    got = adapter.expanded_input_matrix(x)
    assert torch.equal(got, _padded_slices(adapter, x))
    # and the reference patches (groups: averaged over channel groups first)
    groups = conv.groups
    ungrouped = {k: v for k, v in kwargs.items() if k != "groups"}
    single = cls(4 // groups, 4, **ungrouped).double()
    x64 = x.double().reshape(3, groups, 4 // groups, *spatial).mean(1)
    patches = conv_patches(single, x64) if cls is nn.Conv2d else None
    if patches is not None:
        rows = patches.shape[0] * patches.shape[1]
        want = patches.flatten(0, 1) / math.sqrt(rows)
        if conv.bias is not None:
            want = torch.nn.functional.pad(want, (0, 1), value=1 / math.sqrt(rows))
        assert_close(got, want, dtype)


@pytest.mark.parametrize("name", list(NOT_SHIFTED))
def test_other_geometries_keep_the_padded_slices(name: str) -> None:
    cls, kwargs, spatial = NOT_SHIFTED[name]
    conv = cls(4, 3, **kwargs)
    x = torch.randn(2, 4, *spatial)
    assert conv_module._flat_shifts(conv, x) is None
    assert conv_module._flat_shifts(conv.half(), x.half()) is None  # (float16: no)
