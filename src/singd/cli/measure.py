"""Cost accounting shared by ``singd compare``/``overhead`` and ``benchmarks/step_time.py``.

Memory (definitions used in every table):

* **optimizer state** — the bytes of every distinct tensor storage reachable from
  ``optimizer.state_dict()`` (momentum buffers, Adam moments, Kronecker factors
  and their momenta, KFAC statistics and inverses). Transient buffers that exist
  only between a backward pass and ``step()`` (SINGD's :math:`H_K, H_C`, KFAC's
  batch statistics) are not included;
* **memory** — parameter bytes + optimizer-state bytes: what training keeps
  between two steps, without activations and gradients;
* on a GPU, :func:`peak_cuda_memory` gives the peak allocated memory of a
  training step (parameters, gradients, activations and state), like the poster;
  on a CPU, :func:`saved_activation_bytes` lets ``singd overhead`` estimate it as
  parameters + gradients + activations saved for backward + optimizer state.

Time: :func:`interleaved_times` runs the candidates round-robin, so slow phases of
the machine (other processes, frequency changes) hit every candidate alike. Its clock
is elapsed time, or (``CLOCKS["cpu"]``) the CPU time of the calling thread, which
leaves out the time the thread waits for a core on a machine shared with other jobs
(one-thread CPU runs only: it misses other threads' and the GPU's work).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

#: The clocks :func:`interleaved_times` can time with: elapsed time, or the calling
#: thread's CPU time.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


def unique_storage_bytes(tensors: Iterator[Tensor] | list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats count once)."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state_dict()`` (module docstring)."""
    return unique_storage_bytes(tensors_in(optimizer.state_dict()))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters."""
    return unique_storage_bytes(list(model.parameters()))


def saved_activation_bytes(
    forward: Callable[[], Any], exclude: Iterator[Tensor] | list[Tensor]
) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``forward()``.

    Storages of ``exclude`` (the parameters, which autograd saves too) are not counted.
    Together with parameters, gradients and optimizer state this estimates the
    peak memory of a training step where no allocator statistics exist (CPU).
    """
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
    saved: dict[tuple[torch.device, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in skip:
            saved[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that wall-clock times include it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_cuda_memory(step: Callable[[], None], device: torch.device | str) -> int:
    """Peak allocated CUDA memory in bytes while ``step()`` runs (everything alive counts).

    Raises:
        ValueError: If ``device`` is not a CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"peak_cuda_memory needs a CUDA device, got {device}.")
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def interleaved_times(
    rounds: Mapping[str, Callable[[], None]],
    repeats: int,
    *,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time each candidate's ``round()`` ``repeats`` times, round-robin, in seconds.

    Args:
        rounds: Candidate name → a callable doing one unit of work (e.g. T steps).
        repeats: Timed calls per candidate.
        warmup: Untimed calls per candidate first (allocations, lazy state).
        device: Synchronised around each call.
        progress: Called after each timed call (e.g. a progress bar's update).
        clock: What is timed (one of :data:`CLOCKS`).

    Returns:
        Candidate name → the ``repeats`` durations, in the order measured.
    """
    for _ in range(warmup):
        for work in rounds.values():
            work()
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(repeats):
        for name, work in rounds.items():
            synchronize(device)
            start = clock()
            work()
            synchronize(device)
            times[name].append(clock() - start)
            if progress is not None:
                progress()
    return times


def median(values: list[float]) -> float:
    """The median (NaN for an empty list)."""
    return statistics.median(values) if values else float("nan")
