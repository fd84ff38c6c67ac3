r"""Fully sharded data parallelism: models wrapped with FSDP2's ``fully_shard``.

``fully_shard`` (``torch.distributed.fsdp``, FSDP2) turns every parameter into a
DTensor sharded on dim 0 over a device mesh; during forward and backward FSDP
all-gathers a module's parameters, and after backward it reduce-scatters the
gradients, so each rank ends up with the *averaged* gradient of its own shard. The
Kronecker factors need neither the full weight nor, except on one rank, the full
gradient:

1. **statistics** come from each rank's local batch, as in every mode: the hooks sit
   on the wrapped modules and see their (unsharded) inputs and output gradients.
   At refresh steps the factor-free statistics (:mod:`singd.functional.statistics`)
   are reduce-scattered onto each layer's **owner** (cost-balanced, as in
   :class:`~singd.distributed.sharded.Sharded`), so per rank the factors and their
   refresh fall to about 1/R;
2. the **gradient matrix** :math:`[\nabla W | \nabla b]` is formed from the sharded
   gradients as a DTensor (rows sharded like the weight, columns for an
   embedding's transposed weight), and one ``all_to_all`` sends every rank's piece
   of it to the owner, which now holds the full gradient of its layers only::

       rank 0 │ G_a[0:4] G_b[0:2] │ ──▶ owner of a: G_a = [G_a[0:4]; G_a[4:7]]
       rank 1 │ G_a[4:7] G_b[2:4] │ ──▶ owner of b: G_b = [G_b[0:2]; G_b[2:4]]

3. the owner preconditions, and a second ``all_to_all`` sends each rank the rows of
   the natural gradient that match its shards; they come back as DTensors with the
   gradient's placements, so the parameter step (momentum, weight decay, the
   learning rate) runs on the shards, and so do the fallback rules (norm layers,
   embeddings without factors, raw parameters: DTensors with DTensor moments).

The traffic of steps 2 and 3 is one gradient's worth each, as a reduce-scatter and an
all-gather would be, but it ends on one rank per layer instead of all of them.

**Exactness.** FSDP's reduce-scatter averages the gradients over all ranks, so for
``loss_average=None`` (a summed loss) they are multiplied by the number of ranks, as
behind the DDP wrapper; the statistics are averaged or summed as in
:mod:`singd.distributed.base`. R ranks on equal parts of a batch then take the steps
one process takes on the whole batch, up to the order of summation.

**HSDP** (a 2-D mesh, placements ``(Replicate(), Shard(0))``): the statistics are
first all-reduced over the replicate dimension, then each shard group owns and
refreshes the factors as above; the replica groups compute the same factors. Other
DTensor layouts (tensor parallelism, FSDP × TP) are refused with a clear error.

Not supported: a ``torch.amp.GradScaler`` (each rank sees only its shards when it
checks for inf; FSDP2 trains in bfloat16 through ``MixedPrecisionPolicy``, which
needs no scaler), and a DDP wrapper around a ``fully_shard`` model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from singd.distributed.base import is_dtensor, statistics
from singd.distributed.collectives import exchange, launch_all_reduce, launch_reduce_scatter
from singd.distributed.protocol import DistributedOptimizer
from singd.distributed.sharded import Sharded

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def chunk_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``torch.chunk``'s pieces of ``n`` rows over ``parts`` ranks (DTensor's
    ``Shard`` layout), trailing empty pieces included."""
    full = math.ceil(n / parts) if n else 0
    return [max(0, min(full, n - r * full)) for r in range(parts)]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a DTensor's pieces live along its sharded dimension."""

    tensor: Any  # the DTensor (its mesh, placements, global shape and stride)
    dim: int  # the sharded tensor dimension
    sizes: tuple[int, ...]  # piece size along ``dim`` on each rank of the shard group

    def local_shape(self, rank: int) -> torch.Size:
        shape = list(self.tensor.shape)
        shape[self.dim] = self.sizes[rank]
        return torch.Size(shape)

    def numel(self, rank: int) -> int:
        return int(self.local_shape(rank).numel())


class FSDP2(Sharded):
    """Kronecker factors for a model wrapped with ``fully_shard`` (FSDP2, and HSDP).

    Each rank owns the factors of a cost-balanced subset of the layers, receives their
    full gradients, preconditions them and sends the natural gradient back to the
    shards (module docstring). Selected by ``distributed="auto"`` (or ``"fsdp2"``)
    when the model is ``fully_shard``-ed; the process groups come from the
    parameters' device mesh.

    ``state_dict()`` is a collective in this mode (as in ``"sharded"``): every rank
    gets every layer's factors. ``sharded_state_dict()`` /
    ``load_sharded_state_dict()`` are what :mod:`torch.distributed.checkpoint` needs
    (see :mod:`singd.distributed.checkpoint`).

    Args:
        overlap: Launch the statistics' collectives asynchronously.
    """

    def __init__(self, *, overlap: bool = True) -> None:
        super().__init__(None, overlap=overlap)
        self.mesh: DeviceMesh | None = None
        #: The replicate dimension's group (HSDP) and its size; None / 1 for FSDP.
        self.replicate_group: dist.ProcessGroup | None = None
        self.replicas = 1
        self._layouts: dict[str, _Layout] = {}

    # --- set-up --------------------------------------------------------------------------
    def attach(self, optimizer: DistributedOptimizer, wrapper: nn.Module | None) -> None:
        """Bind to the optimizer; take the process groups from the parameters' mesh.

        Raises:
            TypeError: For a DDP wrapper, parameters that are not sharded by
                ``fully_shard``, several meshes, and tensor-parallel layouts.
        """
        if self._optimizer is not None and self._optimizer is not optimizer:
            raise ValueError(f"This {type(self).__name__} already serves another optimizer.")
        if wrapper is not None:
            raise TypeError(
                "A DistributedDataParallel wrapper around a fully_shard model is not supported: "
                "fully_shard already reduces the gradients. Pass the fully_shard model itself."
            )
        self._optimizer = optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        plain = [optimizer.param_name(p) for p in params if not is_dtensor(p)]
        if plain:
            raise TypeError(
                f"distributed='fsdp2' needs every trained parameter sharded by fully_shard; "
                f"{', '.join(plain[:5])}{' ...' if len(plain) > 5 else ''} are plain tensors. "
                "Call fully_shard on the root module too (after its submodules)."
            )
        check_fsdp_layout(optimizer.model, params, optimizer.param_name)
        if params:
            self._set_mesh(params[0].device_mesh)

    def _set_mesh(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        if mesh.ndim == 2:  # HSDP: (replicate, shard)
            self.replicate_group = mesh.get_group(0)
            self.replicas = mesh.size(0)
            self._set_group(mesh.get_group(1))
        else:
            self._set_group(mesh.get_group(0))

    @property
    def data_parallel_size(self) -> int:
        """All ranks that see different data (replicas × shards)."""
        return self.replicas * self.world_size

    # --- hooks ---------------------------------------------------------------------------
    def before_step(self, optimizer: DistributedOptimizer) -> None:
        """Refuse a GradScaler (each rank would check only its own shards for inf)."""
        if getattr(optimizer, "found_inf", None) is not None:
            raise RuntimeError(
                "torch.amp.GradScaler is not supported with fully_shard: each rank checks only "
                "its gradient shards for inf, so ranks could disagree on skipping a step. Train "
                "in bfloat16 with fully_shard(mp_policy=MixedPrecisionPolicy(param_dtype="
                "torch.bfloat16, reduce_dtype=torch.float32)), which needs no scaler."
            )

    def reduce_gradients(self, optimizer: DistributedOptimizer) -> None:
        """No-op: ``fully_shard`` has reduced the gradients at the end of backward."""

    def synchronize(self, optimizer: DistributedOptimizer) -> None:
        """Sum instead of average for ``loss_average=None``; statistics onto their owners."""
        if self.data_parallel_size > 1:
            for grad, averaged in zip(*optimizer.gradients(), strict=True):
                if not averaged:
                    grad.mul_(self.data_parallel_size)
        layers = optimizer.due_layers()
        tensors, average, layer_index = statistics(optimizer, layers)
        if self.replicate_group is not None:
            launch_all_reduce(
                tensors,
                average,
                world_size=self.replicas,
                group=self.replicate_group,
                overlap=self.overlap,
            )()
        owners = [self.owner(layers[i].name) for i in layer_index]
        launch_reduce_scatter(
            tensors,
            average,
            owners,
            rank=self.rank,
            world_size=self.world_size,
            group=self.group,
            overlap=self.overlap,
        )()
        for layer in layers:
            if not self.owns(layer.name):
                optimizer.drop_statistics(layer)

    def owned_gradients(
        self, optimizer: DistributedOptimizer, grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The full gradient matrices of this rank's layers, gathered from the shards."""
        self._layouts = {name: self._layout(name, G) for name, G in grads.items()}
        # (the gradients of fully_shard layers are DTensors)
        local = {name: G.to_local() for name, G in grads.items()}  # type: ignore[attr-defined]
        full: dict[str, Tensor] = {}
        for sharded in self._by_dtype(local):
            send: list[list[Tensor]] = [[] for _ in range(self.world_size)]
            for n in sharded:
                send[self.owner(n)].append(local[n])
            mine = [n for n in sharded if self.owns(n)]
            received = exchange(
                send,
                [sum(self._layouts[n].numel(r) for n in mine) for r in range(self.world_size)],
                dtype=local[sharded[0]].dtype,
                device=local[sharded[0]].device,
                group=self.group,
            )
            pieces: dict[str, list[Tensor]] = {n: [] for n in mine}
            for r, flat in enumerate(received):
                offset = 0
                for n in mine:
                    numel = self._layouts[n].numel(r)
                    pieces[n].append(
                        flat[offset : offset + numel].view(self._layouts[n].local_shape(r))
                    )
                    offset += numel
            for n in mine:
                full[n] = torch.cat(pieces[n], dim=self._layouts[n].dim)
        return full

    def share_updates(
        self,
        optimizer: DistributedOptimizer,
        updates: dict[str, Tensor],
        grads: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """Send each rank its rows of the owners' natural gradients, as DTensors laid out
        like the gradients (so the parameter step runs on the shards)."""
        from torch.distributed.tensor import DTensor

        result: dict[str, Tensor] = {}
        local: dict[str, Tensor] = {}
        for sharded in self._by_dtype(updates, all_layers=True):
            send: list[list[Tensor]] = [[] for _ in range(self.world_size)]
            for n in sharded:
                if self.owns(n):
                    layout = self._layouts[n]
                    for r, piece in enumerate(updates[n].split(list(layout.sizes), dim=layout.dim)):
                        send[r].append(piece.contiguous())
            like = self._layouts[sharded[0]].tensor
            numels = [
                sum(self._layouts[n].numel(self.rank) for n in sharded if self.owner(n) == r)
                for r in range(self.world_size)
            ]
            received = exchange(
                send,
                numels,
                dtype=like.dtype,
                device=like.to_local().device,
                group=self.group,
            )
            for r, flat in enumerate(received):
                offset = 0
                for n in sharded:
                    if self.owner(n) != r:
                        continue
                    numel = self._layouts[n].numel(self.rank)
                    local[n] = flat[offset : offset + numel].view(
                        self._layouts[n].local_shape(self.rank)
                    )
                    offset += numel
        for n, layout in self._layouts.items():
            G = layout.tensor
            result[n] = DTensor.from_local(
                local[n].to(G.dtype),
                G.device_mesh,
                G.placements,
                run_check=False,
                shape=G.shape,
                stride=G.stride(),
            )
        return result

    # --- helpers -------------------------------------------------------------------------
    def _layout(self, name: str, G: Tensor) -> _Layout:
        from torch.distributed.tensor import Replicate, Shard

        if not is_dtensor(G):
            raise TypeError(f"Layer {name!r}: its gradient is not a DTensor under fully_shard.")
        placements = G.placements  # type: ignore[attr-defined]
        if self.replicate_group is not None and not isinstance(placements[0], Replicate):
            raise TypeError(f"Layer {name!r}: gradient layout {placements} is not HSDP's.")
        shard = placements[-1]
        if not isinstance(shard, Shard):
            raise TypeError(
                f"Layer {name!r}: its gradient matrix has placement {shard}, expected a Shard "
                "(its adapter's grad_matrix must keep the weight's sharding)."
            )
        dim = shard.dim % G.ndim
        sizes = chunk_sizes(G.shape[dim], self.world_size)
        if G.to_local().shape[dim] != sizes[self.rank]:  # type: ignore[attr-defined]
            raise RuntimeError(
                f"Layer {name!r}: the gradient shard has {G.to_local().shape[dim]} rows along "  # type: ignore[attr-defined]
                f"dim {dim}, torch.chunk's layout {sizes[self.rank]}; an unsupported sharding."
            )
        return _Layout(G, dim, tuple(sizes))

    def _by_dtype(self, tensors: dict[str, Tensor], *, all_layers: bool = False) -> list[list[str]]:
        """Layer names grouped by gradient dtype, in layer order (the same on every rank)."""
        groups: dict[torch.dtype, list[str]] = {}
        names = self._layouts if all_layers else tensors
        for n in names:
            groups.setdefault(self._layouts[n].tensor.dtype, []).append(n)
        return list(groups.values())


def check_fsdp_layout(
    model: nn.Module, params: list[Tensor], param_name: Callable[[Tensor], str]
) -> None:
    """Raise ``TypeError`` unless every DTensor parameter has FSDP2's (or HSDP's) layout.

    FSDP2 shards on dim 0 over a 1-D mesh (``Shard(0)``); HSDP replicates over the first
    dimension of a 2-D mesh (``(Replicate(), Shard(0))``). Anything else, or a DTensor
    parameter outside every ``fully_shard`` module, is a tensor-parallel layout.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Replicate, Shard

    managed = {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    meshes = set()
    for p in params:
        name = param_name(p)
        if id(p) not in managed:
            raise TypeError(
                f"Parameter {name!r} is a DTensor outside every fully_shard module (a tensor-"
                "parallel layout?). Tensor parallelism is not supported: use fully_shard "
                "(FSDP2) or HSDP, DistributedDataParallel, or distributed='sharded'."
            )
        placements = tuple(p.placements)  # type: ignore[attr-defined]
        fsdp = placements == (Shard(0),)
        hsdp = len(placements) == 2 and placements == (Replicate(), Shard(0))
        if not (fsdp or hsdp):
            raise TypeError(
                f"Parameter {name!r} has DTensor placements {placements}; supported are "
                "fully_shard's (Shard(0),) on a 1-D mesh and HSDP's (Replicate(), Shard(0)) on "
                "a 2-D mesh. Tensor parallelism (and FSDP × TP) is not supported."
            )
        meshes.add(p.device_mesh)  # type: ignore[attr-defined]
    if len(meshes) > 1:
        raise TypeError(
            "The parameters live on several device meshes; distributed='fsdp2' needs one mesh "
            "for the whole model."
        )
