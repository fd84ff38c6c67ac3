"""Checks of a checkpoint's contents, run before ``load_state_dict`` changes anything.

Every refusal is a ``ValueError`` that names where (the param group, the parameter
or the layer), the tensor, and what was expected and found: missing and unexpected
entries, shapes, non-tensors and inf/NaN. The optimizer first checks everything,
then loads (:meth:`singd.optim.base.KroneckerOptimizer.load_state_dict`), so a
refused checkpoint leaves the optimizer exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

#: ``optimizer.state`` entries that have the parameter's shape (momentum buffers and
#: the fallback's moments) and the scalar ones (AdamW's step count).
PARAMETER_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq")
SCALARS = ("step",)


def check_tensor(where: str, value: Any, shape: Sequence[int] | None = None) -> Tensor:
    """``value`` must be a tensor (of ``shape`` if given) with finite entries.

    Raises:
        ValueError: Naming ``where``, the expected and the found shape or type, or
            how many entries are inf/NaN.
    """
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: expected a tensor, found {type(value).__name__}.")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where}: expected shape {tuple(shape)}, found {tuple(value.shape)}.")
    if value.is_floating_point() or value.is_complex():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(
                f"{where}: {bad} of its {value.numel()} entries are inf/NaN; a checkpoint "
                "with non-finite state is refused (it would make every later step NaN)."
            )
    return value


def check_parameter_states(
    saved: Mapping[str, Any],
    params: Sequence[Tensor],
    names: Sequence[str],
) -> None:
    """The per-parameter part of a torch-format state dict (``state``, ``param_groups``).

    Args:
        saved: The state dict (``state`` keyed by the saved parameter ids, and
            ``param_groups`` whose ``params`` list those ids in order).
        params: The optimizer's parameters, in its groups' order.
        names: Their names in the model, for messages.

    Raises:
        ValueError: For a group size that differs, a tensor of the wrong shape, or
            inf/NaN.
    """
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(params):
        raise ValueError(f"The checkpoint has {len(ids)} parameters, this optimizer {len(params)}.")
    states = saved.get("state", {})
    if not isinstance(states, Mapping):
        raise ValueError(f"'state': expected a dict, found {type(states).__name__}.")
    for saved_id, p, name in zip(ids, params, names, strict=True):
        state = states.get(saved_id)
        if state is None:
            continue
        if not isinstance(state, Mapping):
            raise ValueError(f"state of {name!r}: expected a dict, found {type(state).__name__}.")
        for key, value in state.items():
            where = f"state of parameter {name!r}, {key!r}"
            if key in PARAMETER_SHAPED:
                check_tensor(where, value, p.shape)
            elif key in SCALARS:
                if isinstance(value, Tensor):
                    check_tensor(where, value, ())
                    value = float(value)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"{where}: expected a count ≥ 0, found {value!r}.")
            elif isinstance(value, Tensor):
                check_tensor(where, value)


def check_layer_state(
    layer: str,
    saved: Any,
    expected: Mapping[str, Sequence[int]],
    optional: Sequence[str] = (),
) -> None:
    """One layer's preconditioner state: the expected tensors, with their shapes, finite.

    Args:
        layer: The layer's module name.
        saved: The saved state (a dict of tensors; empty: not allocated yet).
        expected: The shape of every tensor the layer's state holds.
        optional: Names that may be missing (or present though not expected, e.g.
            momenta saved with α₁ ≠ 0 loaded with α₁ = 0), checked when present.

    Raises:
        ValueError: Naming the layer, the tensor, the expected and found shapes.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"Layer {layer!r}: expected a dict of tensors, found {type(saved).__name__}."
        )
    if not saved:
        return  # (factors not allocated yet: the layer starts afresh)
    missing = sorted(set(expected) - set(saved) - set(optional))
    unexpected = sorted(set(saved) - set(expected) - set(optional))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected)}")
        raise ValueError(
            f"Layer {layer!r}: the checkpoint's state has {'; '.join(parts)} (expected "
            f"{', '.join(sorted(expected))})."
        )
    for name, value in saved.items():
        check_tensor(f"Layer {layer!r}, {name}", value, expected.get(name))
