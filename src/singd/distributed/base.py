r"""Distribution as a strategy: the :class:`Distributor` interface and the no-op :class:`Local`.

A Kronecker optimizer (:class:`~singd.optim.base.KroneckerOptimizer`) delegates
everything that involves other data-parallel ranks to one ``Distributor`` object,
chosen with its ``distributed`` argument. The optimizer calls it at a few fixed
points of ``step()`` and checkpointing; the update rules never see a rank.

============================  ==============================================================
hook                          called
============================  ==============================================================
:meth:`~Distributor.attach`        once, at the end of the optimizer's construction
:meth:`~Distributor.before_step`   first thing in ``step()`` (consistency checks)
:meth:`~Distributor.synchronize`   after the skip decision, before any update: make the
                                   gradients and the due layers' statistics global
:meth:`~Distributor.owns`          which layers this rank refreshes and preconditions
:meth:`~Distributor.share_updates` after preconditioning: every rank gets every layer's
                                   natural gradient
:meth:`~Distributor.gather_layer_states`  in ``state_dict()``: every layer's factors
============================  ==============================================================

Semantics (derived in ``docs/distributed.md``). With R ranks, equal local batches of
B/R samples, and a loss that averages as ``loss_average`` says, a step on R ranks
equals one process's step on the concatenated batch when

* :math:`U` (and :math:`H_K`) are **averaged** over ranks: each rank normalises its
  :math:`U_r` by its own rows, for every ``loss_average``;
* :math:`G` (and :math:`H_C`) are **averaged** for ``"batch"``/``"batch+sequence"``
  (each rank's loss is a mean over its own terms) and **summed** for ``None`` (a summed
  loss: the full-batch :math:`G` is the sum of the per-sample terms). The published
  code sums :math:`H_K` too for ``None``, which makes it R times too large;
* gradients are **averaged** (``"batch"``/``"batch+sequence"``) or **summed** (``None``).
  The DDP wrapper always averages, so for ``None`` the gradients are multiplied by R.

Because every rank then holds the same reduced statistics and gradients and runs the
same deterministic computation (or receives the one result its owner computed), the
ranks' parameters and factors stay identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from singd.optim.base import KroneckerOptimizer, Layer

#: Values of the optimizers' ``distributed`` argument besides a :class:`Distributor`.
DISTRIBUTED_MODES = ("auto", "replicated", "sharded", "fsdp2", None)


class Distributor:
    """How a Kronecker optimizer shares work among data-parallel ranks.

    The base class is the single-process behaviour (no communication); subclasses
    override the hooks they need. One distributor serves one optimizer.
    """

    #: Whether every rank holds every layer's factors (False: each rank owns a subset).
    replicates_factors: bool = True
    #: This rank and the number of ranks in the distributor's process group.
    rank: int = 0
    world_size: int = 1

    def attach(self, optimizer: KroneckerOptimizer, wrapper: nn.Module | None) -> None:
        """Bind to ``optimizer`` (its layers and param groups are registered).

        Args:
            optimizer: The optimizer this distributor serves.
            wrapper: The ``DistributedDataParallel`` wrapper the optimizer was given
                (its gradients arrive averaged over ranks), or None.
        """

    def before_step(self, optimizer: KroneckerOptimizer) -> None:
        """Checks at the start of ``step()`` (may raise)."""

    def reduce_gradients(self, optimizer: KroneckerOptimizer) -> None:
        """Make the gradients global now (see ``synchronize_gradients``)."""

    def synchronize(self, optimizer: KroneckerOptimizer) -> None:
        """Make the gradients and the due layers' statistics global (they are local)."""

    def owns(self, layer_name: str) -> bool:
        """Whether this rank refreshes and preconditions ``layer_name``."""
        return True

    def owned_gradients(
        self, optimizer: KroneckerOptimizer, grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Gradient matrices of every layer with a gradient → the full ones of the layers
        this rank preconditions."""
        return {name: G for name, G in grads.items() if self.owns(name)}

    def share_updates(
        self, optimizer: KroneckerOptimizer, updates: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Natural gradients of the owned layers → those of every layer with a gradient."""
        return updates

    def gather_layer_states(
        self, optimizer: KroneckerOptimizer, states: dict[str, dict[str, Tensor]]
    ) -> dict[str, dict[str, Tensor]]:
        """This rank's per-layer checkpoint tensors → every layer's (for ``state_dict``)."""
        return states

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


class Local(Distributor):
    """One process, or ranks that deliberately train independently: no communication."""


# --- what the distributors read from the optimizer ----------------------------------------
def average_over_ranks(group: dict[str, Any]) -> bool:
    """Whether a param group's gradients and output-side statistics are averaged over
    ranks (True) or summed (``loss_average=None``, a summed loss)."""
    return group["loss_average"] is not None


def gradients(optimizer: KroneckerOptimizer) -> tuple[list[Tensor], list[bool]]:
    """The gradients of every parameter the optimizer updates (Kronecker layers and the
    fallback), in param-group order, with their averaging flags."""
    grads: list[Tensor] = []
    average: list[bool] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "Sparse gradients cannot be reduced over ranks; use dense gradients."
                    )
                grads.append(p.grad)
                average.append(average_over_ranks(group))
    return grads, average


def due_layers(optimizer: KroneckerOptimizer) -> list[Layer]:
    """The layers refreshed in this step (:meth:`KroneckerOptimizer.due_layers`)."""
    return optimizer.due_layers()


def statistics(
    optimizer: KroneckerOptimizer, layers: list[Layer]
) -> tuple[list[Tensor], list[bool], list[int]]:
    """The live accumulator tensors of ``layers``, their averaging flags, and the index of
    the layer each belongs to. Input-side statistics are always averaged."""
    tensors: list[Tensor] = []
    average: list[bool] = []
    layer_index: list[int] = []
    for index, layer in enumerate(layers):
        input_side, output_side = optimizer.preconditioners[layer.name].statistics()
        avg_output = average_over_ranks(optimizer.group_of(layer.name))
        for side, avg in ((input_side, True), (output_side, avg_output)):
            tensors.extend(side)
            average.extend([avg] * len(side))
            layer_index.extend([index] * len(side))
    return tensors, average, layer_index


# --- wrappers and the ``distributed`` argument ---------------------------------------------
def _fsdp1_type() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover (torch without FSDP)
        return None
    return FullyShardedDataParallel


def unwrap_model(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model whose layers get hooks, and its ``DistributedDataParallel`` wrapper.

    A ``fully_shard`` (FSDP2) model is its own model: the hooks go on its modules.

    Raises:
        TypeError: For ``nn.DataParallel`` (one process driving several GPUs: its
            per-GPU replicas are rebuilt at every forward), for the old
            ``FullyShardedDataParallel`` wrapper (its flat parameters have no per-layer
            weight; use ``fully_shard``) and for a DDP wrapper nested inside another
            module (pass the wrapper itself).
    """
    if isinstance(model, nn.DataParallel):
        raise TypeError(
            "nn.DataParallel is not supported: it rebuilds per-GPU replicas of the model at "
            "every forward, outside the optimizer's hooks. Launch one process per GPU with "
            "torchrun and wrap the model in torch.nn.parallel.DistributedDataParallel "
            "(see docs/distributed.md)."
        )
    fsdp1 = _fsdp1_type()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise TypeError(
            "The FullyShardedDataParallel wrapper (FSDP1) is not supported: it flattens the "
            "parameters of each wrapped module into one FlatParameter, so a layer has no weight "
            "of its own. Shard the model with FSDP2 instead, "
            "torch.distributed.fsdp.fully_shard (per layer and at the root), which SINGD and "
            "KFAC support (docs/distributed.md), or use DistributedDataParallel."
        )
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(model, ddp):
        return model.module, model
    if any(isinstance(m, ddp) for m in model.modules()):
        raise TypeError(
            "The model contains a DistributedDataParallel wrapper below its top level "
            "(e.g. torch.compile(ddp_model)): pass the DDP-wrapped model itself."
        )
    return model, None


def resolve_distributor(
    spec: Any, wrapper: nn.Module | None, model: nn.Module | None = None
) -> Distributor:
    """Turn the optimizers' ``distributed`` argument into a :class:`Distributor`.

    * ``"auto"`` (default): :class:`~singd.distributed.FSDP2` if ``model`` is
      ``fully_shard``-ed; :class:`~singd.distributed.Replicated` if the model is
      DDP-wrapped or ``torch.distributed`` is initialised with more than one rank;
      else :class:`Local`;
    * ``"replicated"`` / ``"sharded"`` / ``"fsdp2"``: those strategies
      (``torch.distributed`` must be initialised; ``"fsdp2"`` exactly for
      ``fully_shard`` models);
    * ``None``: :class:`Local`, no communication even if initialised;
    * a :class:`Distributor` instance, e.g. ``Sharded(process_group=pg)``.

    Raises:
        TypeError: For DTensor parameters without ``fully_shard`` (tensor parallelism).
        ValueError: For other values, for a strategy without an initialised process
            group, for a ``fully_shard`` model with another strategy (and ``"fsdp2"``
            without one), and for ``None`` with a DDP-wrapped model on several ranks (the
            ranks' Kronecker factors would drift apart).
    """
    from singd.distributed.fsdp2 import FSDP2, is_dtensor, is_fully_sharded
    from singd.distributed.replicated import Replicated
    from singd.distributed.sharded import Sharded

    sharded_model = model is not None and is_fully_sharded(model)
    if model is not None and not sharded_model and any(map(is_dtensor, model.parameters())):
        raise TypeError(
            "The model has DTensor parameters but no fully_shard module: tensor-parallel "
            "layouts are not supported. Shard the model with "
            "torch.distributed.fsdp.fully_shard (FSDP2, or HSDP on a 2-D mesh), or train it "
            "replicated with DistributedDataParallel or distributed='sharded'."
        )
    if isinstance(spec, Distributor):
        if sharded_model and not isinstance(spec, FSDP2):
            raise ValueError(
                f"The model is sharded with fully_shard; {type(spec).__name__} cannot train it. "
                "Use distributed='auto' or 'fsdp2' (singd.distributed.FSDP2)."
            )
        return spec
    initialised = dist.is_available() and dist.is_initialized()
    several = initialised and dist.get_world_size() > 1
    if sharded_model and spec not in ("auto", "fsdp2"):
        raise ValueError(
            f"The model is sharded with fully_shard (FSDP2); distributed={spec!r} cannot train "
            "it (its parameters are DTensor shards). Use distributed='auto' or 'fsdp2'."
        )
    if spec is None:
        if wrapper is not None and several:
            raise ValueError(
                "distributed=None with a DistributedDataParallel model on several ranks would "
                "let the ranks' Kronecker factors drift apart; use 'auto', 'replicated' or "
                "'sharded'."
            )
        return Local()
    if spec == "auto":
        if sharded_model:
            return FSDP2()
        return Replicated() if wrapper is not None or several else Local()
    if spec in ("replicated", "sharded", "fsdp2"):
        if not initialised:
            raise ValueError(
                f"distributed={spec!r} needs torch.distributed: call "
                "torch.distributed.init_process_group() before creating the optimizer."
            )
        if spec == "fsdp2" and not sharded_model:
            raise ValueError(
                "distributed='fsdp2' is for models sharded with "
                "torch.distributed.fsdp.fully_shard; this model has no fully_shard module. "
                "Use 'replicated' or 'sharded' for a replicated model."
            )
        return {"replicated": Replicated, "sharded": Sharded, "fsdp2": FSDP2}[spec]()
    raise ValueError(
        f"Invalid distributed {spec!r}. Valid: 'auto', 'replicated', 'sharded', 'fsdp2', None, "
        "or a singd.distributed.Distributor instance."
    )


def parameter_checksums(params: list[Tensor]) -> Tensor:
    """One float64 sum per parameter: a cheap fingerprint to compare across ranks."""
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([p.detach().sum(dtype=torch.float64) for p in params])
