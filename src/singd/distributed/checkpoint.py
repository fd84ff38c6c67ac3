r"""Distributed checkpoints of the optimizers with ``torch.distributed.checkpoint`` (DCP).

DCP saves every rank's part of a state dict in parallel and loads it back on **any number
of ranks**, resharding DTensors on the way. The optimizers' own ``state_dict()`` holds
integer parameter ids and, with ``distributed="fsdp2"``, gathers every layer's factors on
every rank; these two functions give DCP what it needs instead::

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from singd.distributed.checkpoint import load_optimizer, optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": optimizer_state_dict(optim)},
             checkpoint_id=path)                                  # on every rank
    ...                                                           # R' ranks, new model/optim
    model_state = get_model_state_dict(model)
    dcp.load({"model": model_state}, checkpoint_id=path)
    set_model_state_dict(model, model_state)
    load_optimizer(optim, path)                                   # on every rank

**Layout** (:func:`optimizer_state_dict`), the conventions of
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``:

* ``"state"``: per parameter, keyed by its **fully qualified name**, the torch.optim-style
  state: ``momentum_buffer`` of the Kronecker layers' weights and biases, the fallback's
  ``step`` / ``exp_avg`` / ``exp_avg_sq`` (AdamW) or ``momentum_buffer`` (SGD). Under
  ``fully_shard`` these are DTensors sharded like the parameter, so DCP reshards them;
* ``"param_groups"``: the param groups as ``state_dict()`` writes them (plain values),
  ``"params"`` listing FQNs;
* one extra section (``"singd"`` or ``"kfac"``, the optimizer's own ``state_dict()`` key):
  ``steps``, the gradient scales, the demoted layers, and ``layers``: each layer's factor
  tensors (``K.…``, ``C.…``, ``m_K.…``, ``m_C.…``; KFAC's ``S_K`` …), keyed by module
  name. With ``fsdp2`` (and ``sharded``) each layer's factors are written by their
  **owner** only, so no rank ever holds all of them.

**How it differs from the state_dict helpers.** ``get_optimizer_state_dict`` keeps only
``"state"`` and ``"param_groups"`` of ``optimizer.state_dict()`` and so would drop the
factors; and before loading into a fresh optimizer it runs one ``optimizer.step()`` on
zero gradients to allocate the state, which a Kronecker optimizer refuses (a refresh step
without curvature statistics). :func:`load_optimizer` instead allocates its
load targets from the checkpoint's metadata (shapes and dtypes of what was saved): the
moments like their parameters (DTensors under ``fully_shard``), the factors of the layers
this rank owns now — ownership follows the new number of ranks.

Resuming is bit-identical: the loaded parameters, moments and factors equal the saved
ones exactly, on any number of ranks (tested 2 → 2 and 2 → 4).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from singd.distributed.base import is_dtensor


@contextlib.contextmanager
def _local_layer_states(optim: Any) -> Iterator[None]:
    distributor = optim.distributor
    previous = getattr(distributor, "gather_states", None)
    if previous is not None:
        distributor.gather_states = False
    try:
        yield
    finally:
        if previous is not None:
            distributor.gather_states = previous


def _param_fqns(optim: Any) -> list[str]:
    """FQNs of the optimizer's parameters, in the order of its integer ids."""
    names = {p: name for name, p in optim.model.named_parameters()}
    return [names[p] for group in optim.param_groups for p in group["params"]]


def optimizer_state_dict(optim: Any) -> dict[str, Any]:
    """The optimizer's state for ``torch.distributed.checkpoint.save`` (module docstring).

    A collective with ``distributed="fsdp2"`` or ``"sharded"``: call it on every rank.
    """
    with _local_layer_states(optim):
        state = optim.state_dict()
    fqns = _param_fqns(optim)
    own_key = optim.state_key
    own = dict(state[own_key])
    own["grad_scales"] = [[int(k), float(v)] for k, v in own["grad_scales"].items()]
    own["layers"] = {name: dict(s) for name, s in own["layers"].items() if s}
    return {
        "state": {fqns[i]: dict(s) for i, s in state["state"].items()},
        "param_groups": [
            {**group, "params": [fqns[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
        own_key: own,
    }


def _set_path(tree: Any, path: tuple[Any, ...], value: Any) -> None:
    """Put ``value`` at ``path`` (string keys: dicts, integer keys: lists, as DCP does)."""
    for key, following in itertools.pairwise(path):
        default: Any = [] if isinstance(following, int) else {}
        if isinstance(tree, list):
            tree.extend([None] * (key + 1 - len(tree)))
            if tree[key] is None:
                tree[key] = default
            tree = tree[key]
        else:
            tree = tree.setdefault(key, default)
    if isinstance(tree, list):
        tree.extend([None] * (path[-1] + 1 - len(tree)))
    tree[path[-1]] = value


def load_optimizer(optim: Any, checkpoint_id: Any, *, key: str = "optim") -> None:
    """Load what :func:`optimizer_state_dict` saved under ``key`` of a DCP checkpoint.

    Works on any number of ranks and in any mode (one process, replicated, sharded,
    fsdp2): the targets are allocated from the checkpoint's metadata, DCP reads (and
    reshards) into them, and ``optim.load_state_dict`` takes the result. Call it on every
    rank, after the model's parameters are loaded.

    Raises:
        ValueError: If the checkpoint has no optimizer under ``key``, or one saved by
            another optimizer type or for other layers.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(checkpoint_id) if isinstance(checkpoint_id, str) else None
    metadata = (reader or dcp.FileSystemReader(str(checkpoint_id))).read_metadata()
    paths = metadata.planner_data or {}
    own_key = optim.state_key
    params = dict(optim.model.named_parameters())
    distributor = optim.distributor
    template: dict[Any, Any] = {}
    for flat, item in metadata.state_dict_metadata.items():
        path = tuple(paths.get(flat, (flat,)))
        if path[0] != key:
            continue
        if not isinstance(item, TensorStorageMetadata):
            _set_path(template, path, 0)  # a plain value: DCP replaces the placeholder
            continue
        section = path[1]
        if section == "state" and path[2] in params and item.size == params[path[2]].shape:
            like = params[path[2]]
            value: Tensor = torch.zeros_like(like, dtype=item.properties.dtype)
        elif section == own_key and path[2] == "layers" and not distributor.owns(path[3]):
            continue  # another rank owns this layer's factors now
        else:
            device = _device_of(optim)
            value = torch.empty(item.size, dtype=item.properties.dtype, device=device)
        _set_path(template, path, value)
    if key not in template or own_key not in template[key]:
        raise ValueError(
            f"The checkpoint has no {type(optim).__name__} state under {key!r} (saved by "
            "another optimizer, or under another key?)."
        )
    dcp.load(template, checkpoint_id=checkpoint_id)
    optim.load_state_dict(_to_state_dict(optim, template[key]))


def _device_of(optim: Any) -> torch.device:
    for p in optim.model.parameters():
        return p.to_local().device if is_dtensor(p) else p.device
    return torch.device("cpu")


def _to_state_dict(optim: Any, loaded: dict[str, Any]) -> dict[str, Any]:
    """The DCP layout back to ``optim.state_dict()``'s (integer ids; every layer)."""
    fqns = _param_fqns(optim)
    index = {name: i for i, name in enumerate(fqns)}
    groups = loaded["param_groups"]
    own_key = optim.state_key
    own = dict(loaded[own_key])
    own["grad_scales"] = {int(k): float(v) for k, v in own.get("grad_scales") or []}
    saved_layers = own.get("layers", {})
    own["fallback_layers"] = own.get("fallback_layers") or {}
    own["layers"] = {  # (the demoted layers leave when the state dict is loaded)
        name: dict(saved_layers.get(name, {}))
        for name in optim.layers
        if name not in own["fallback_layers"]
    }
    unknown = sorted(set(saved_layers) - set(optim.layers))
    if unknown:
        raise ValueError(f"The checkpoint holds layers {unknown} that this optimizer has not.")
    return {
        "state": {index[name]: dict(s) for name, s in loaded.get("state", {}).items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in groups
        ],
        own_key: own,
    }
