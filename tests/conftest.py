"""Fixtures every test module shares: devices, dtypes, and registries left as found.

* ``device``: ``cpu``, and ``cuda`` where a GPU is present (skipped elsewhere), so a
  test that takes it is the same test on every device rather than a CUDA copy.
* ``dtype``: the floating dtypes the optimizers train in.
* Every test runs inside the ``scoped_registration()`` of the structure, layer-adapter
  and fallback-rule registries, so what a test registers does not leak into others.
* Under pytest-xdist (the default run has 2 workers, ``pyproject.toml``) each worker
  computes on one thread, so the workers do not oversubscribe the cores, and the tests
  of each module in :data:`ONE_WORKER_MODULES` run on one worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from singd.layers import scoped_registration as scoped_adapters
from singd.optim.fallback import scoped_registration as scoped_fallbacks
from singd.structures import scoped_registration as scoped_structures

HAS_CUDA = torch.cuda.is_available()


#: The modules whose tests share a module fixture that spawns real processes (the ranks
#: of every scenario): spread over xdist workers, each worker would spawn them again.
ONE_WORKER_MODULES = frozenset({"tests/test_distributed.py", "tests/test_fsdp2.py"})


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread per xdist worker: the workers already use the cores, and
    more threads than cores slow every worker down (the tests' tensors are small)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` (``pyproject.toml``) with every module of
    :data:`ONE_WORKER_MODULES` one group, and every other test sent on its own.

    (xdist's own groups, ``@pytest.mark.xdist_group``, do not group under pytest 9.2:
    xdist 3.8 renames ``item._nodeid``, which pytest no longer reads; the scheduler
    sees only node ids, so the groups are named here by module.)"""
    if config.getvalue("dist") != "loadgroup":
        return None  # another --dist given on the command line: xdist's own
    from xdist.scheduler import LoadGroupScheduling

    class ModuleGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else super()._split_scope(nodeid)

    return ModuleGroups(config, log)


#: ``pytest.param`` of every device; CUDA is skipped without a GPU.
DEVICES = [
    pytest.param(torch.device("cpu"), id="cpu"),
    pytest.param(
        torch.device("cuda"),
        id="cuda",
        marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"),
    ),
]

#: The dtypes a model (and so its factors, by default) can have.
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float16, id="float16"),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a test should pass on (``cuda`` only where there is a GPU)."""
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Each floating dtype a model can train in."""
    return request.param


@pytest.fixture(autouse=True)
def _registries_left_as_found() -> Iterator[None]:
    with scoped_structures(), scoped_adapters(), scoped_fallbacks():
        yield
