r"""Flattened, bucketed collectives on lists of tensors (backend-agnostic: gloo, nccl, ...).

Every helper reduces with ``SUM`` and then divides the entries flagged *average* by
the world size, instead of asking the backend for ``ReduceOp.AVG``: gloo does not
offer ``AVG`` on every torch version, and doing the division ourselves lets one
flat buffer mix averaged and summed tensors, so the mixed ``AVG``/``SUM`` semantics
of :mod:`singd.distributed` cost one collective per bucket, not one per kind.

A *bucket* is one flat buffer of tensors with the same device and dtype, at most
``bucket_bytes`` long (a single larger tensor gets its own bucket). With
``overlap=True`` all buckets are launched asynchronously before the first one is
waited for, so unpacking bucket *i* overlaps with the transfer of bucket *i+1*
(and with anything else launched in between). Every rank must call the helpers
with the same sequence of shapes, dtypes and flags: that is what makes the
results, and therefore every later computation, identical on all ranks.

Each ``launch_*`` function starts the communication and returns a ``finish``
callable that waits and writes the results back; the caller can do other work
in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

Finish = Callable[[], None]

# torch 2.13 renamed the tensor collectives (the old names warn FutureWarning).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nothing() -> None:
    """The ``finish`` of a launch that had nothing to communicate."""


def _by_device_dtype(indices: Sequence[int], tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices grouped by (device, dtype), groups in order of first appearance."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in indices:
        groups.setdefault((tensors[i].device, tensors[i].dtype), []).append(i)
    return list(groups.values())


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int | None) -> list[list[int]]:
    """Split the tensors into buckets of one device and dtype and at most ``bucket_bytes``."""
    buckets: list[list[int]] = []
    for indices in _by_device_dtype(range(len(tensors)), tensors):
        current: list[int] = []
        size = 0
        for i in indices:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if current and bucket_bytes is not None and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            buckets.append(current)
    return buckets


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(
    flat: Tensor, tensors: Sequence[Tensor], average: Sequence[bool], world_size: int
) -> None:
    """Copy the reduced ``flat`` back into ``tensors``, dividing the averaged ones."""
    offset = 0
    for t, avg in zip(tensors, average, strict=True):
        view = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
        if avg and world_size != 1:
            view.div_(world_size)
        if view.data_ptr() != t.data_ptr():
            t.copy_(view)


def launch_all_reduce(
    tensors: Sequence[Tensor],
    average: Sequence[bool],
    *,
    world_size: int,
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int | None = None,
    overlap: bool = True,
) -> Finish:
    """All-reduce every tensor in place: the sum over ranks, divided by the world size where
    ``average`` is True. Returns ``finish`` (the tensors are final once it has run)."""
    pending: list[tuple[dist.Work, Tensor, list[int]]] = []
    for bucket in _buckets(tensors, bucket_bytes):
        members = [tensors[i] for i in bucket]
        if len(members) == 1 and members[0].is_contiguous():
            flat = members[0].view(-1)  # reduce in place: no copy for a bucket of one
        else:
            flat = _flatten(members)
        work = dist.all_reduce(flat, group=group, async_op=overlap)
        if overlap:
            pending.append((work, flat, bucket))
        else:  # blocking: unpack now, before the next bucket is sent
            _unflatten_into(flat, members, [average[i] for i in bucket], world_size)

    def finish() -> None:
        for work, flat, bucket in pending:
            work.wait()
            members = [tensors[i] for i in bucket]
            _unflatten_into(flat, members, [average[i] for i in bucket], world_size)

    return finish


def _owner_chunks(
    indices: Sequence[int], numels: Sequence[int], owners: Sequence[int], world_size: int
) -> tuple[list[list[int]], int]:
    """Indices per owner rank (in order) and the largest chunk (elements)."""
    chunks: list[list[int]] = [[] for _ in range(world_size)]
    for i in indices:
        chunks[owners[i]].append(i)
    return chunks, max(sum(numels[i] for i in chunk) for chunk in chunks)


def launch_reduce_scatter(
    tensors: Sequence[Tensor],
    average: Sequence[bool],
    owners: Sequence[int],
    *,
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None = None,
    overlap: bool = True,
) -> Finish:
    """Reduce every tensor onto its owner rank only (in place there).

    The buffer holds one chunk per rank, rank *r*'s chunk being the tensors *r*
    owns, zero-padded to the largest chunk; one ``reduce_scatter`` then delivers to
    each rank the sum of its own chunk, half the traffic of an all-reduce. After
    ``finish`` the owner's tensors hold the reduced values (divided by the world
    size where ``average``); tensors owned by other ranks are left as they were.
    """
    numels = [t.numel() for t in tensors]
    pending: list[tuple[dist.Work | None, Tensor, list[int]]] = []
    for indices in _by_device_dtype(range(len(tensors)), tensors):
        chunks, largest = _owner_chunks(indices, numels, owners, world_size)
        if largest == 0:
            continue
        like = tensors[indices[0]]
        parts: list[Tensor] = []
        for chunk in chunks:
            parts.extend(tensors[i].reshape(-1) for i in chunk)
            pad = largest - sum(numels[i] for i in chunk)
            if pad:
                parts.append(like.new_zeros(pad))
        flat = torch.cat(parts)
        out = like.new_empty(largest)
        work = _reduce_scatter(out, flat, group=group, async_op=overlap)
        pending.append((work, out, chunks[rank]))

    def finish() -> None:
        for work, out, mine in pending:
            if work is not None:
                work.wait()
            members = [tensors[i] for i in mine]
            _unflatten_into(out, members, [average[i] for i in mine], world_size)

    return finish


def launch_all_gather(
    own: Sequence[Tensor],
    shapes: Sequence[torch.Size],
    dtypes: Sequence[torch.dtype],
    devices: Sequence[torch.device],
    owners: Sequence[int],
    *,
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None = None,
    overlap: bool = True,
) -> tuple[list[Tensor | None], Finish]:
    """Give every rank every tensor, each computed by its owner only.

    ``shapes``/``dtypes``/``devices``/``owners`` describe all tensors (identically
    on every rank); ``own`` are the values of the tensors this rank owns, in order.
    Each rank contributes its chunk (its tensors, zero-padded to the largest chunk)
    to one ``all_gather`` per (device, dtype). Returns the list of all tensors
    (filled in by ``finish``; this rank's own tensors are returned as they are,
    the others are views of the gathered buffer) and ``finish``.
    """
    numels = [int(torch.Size(s).numel()) for s in shapes]
    result: list[Tensor | None] = [None] * len(shapes)
    own_iter = iter(own)
    for i, owner in enumerate(owners):
        if owner == rank:
            result[i] = next(own_iter)
    keys = [(torch.device(dev), dt) for dev, dt in zip(devices, dtypes, strict=True)]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    pending: list[tuple[dist.Work | None, Tensor, list[list[int]], int]] = []
    for (device, dtype), indices in groups.items():
        chunks, largest = _owner_chunks(indices, numels, owners, world_size)
        if largest == 0:
            continue
        mine = [result[i].reshape(-1) for i in chunks[rank]]  # type: ignore[union-attr]
        pad = largest - sum(numels[i] for i in chunks[rank])
        if pad:
            mine.append(torch.zeros(pad, dtype=dtype, device=device))
        chunk = torch.cat(mine)
        out = torch.empty(world_size * largest, dtype=dtype, device=device)
        work = _all_gather(out, chunk, group=group, async_op=overlap)
        pending.append((work, out, chunks, largest))

    def finish() -> None:
        for work, out, chunks, largest in pending:
            if work is not None:
                work.wait()
            for r, chunk in enumerate(chunks):
                if r == rank:
                    continue
                offset = r * largest
                for i in chunk:
                    result[i] = out[offset : offset + numels[i]].view(shapes[i])
                    offset += numels[i]

    return result, finish


def broadcast_coalesced(
    tensors: Sequence[Tensor], *, src: int, group: dist.ProcessGroup | None = None
) -> None:
    """Overwrite the tensors with rank ``src``'s values (one broadcast per device/dtype)."""
    for bucket in _buckets(tensors, None):
        members = [tensors[i] for i in bucket]
        flat = _flatten(members)
        dist.broadcast(flat, src=src, group=group)
        _unflatten_into(flat, members, [False] * len(members), 1)


def exchange(
    send: Sequence[Sequence[Tensor]],
    receive_numels: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> list[Tensor]:
    """Personalised exchange: rank *r* sends ``send[r]`` (flattened, concatenated) to rank
    *r* and receives ``receive_numels[s]`` elements from every rank *s*.

    One ``all_to_all_single`` with uneven splits (gloo and nccl both offer it); every
    tensor must have ``dtype`` and ``device``. Returns the flat buffer received from each
    rank (views of one buffer).
    """
    send_numels = [sum(t.numel() for t in part) for part in send]
    pieces = [t.reshape(-1) for part in send for t in part]
    flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(receive_numels), dtype=dtype, device=device)
    dist.all_to_all_single(out, flat, list(receive_numels), send_numels, group=group)
    return list(out.split(list(receive_numels)))
