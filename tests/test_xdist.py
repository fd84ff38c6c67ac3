"""The default run's pytest-xdist split (``tests/conftest.py``, ``pyproject.toml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parents[1]


class _Config:
    """The two options the scheduler reads: ``--dist`` and the workers (``--tx``)."""

    def __init__(self, dist: str) -> None:
        self.dist = dist

    def getvalue(self, name: str) -> Any:
        return {"dist": self.dist, "tx": ["2*popen"]}[name]


def test_each_one_worker_module_is_one_unit_and_every_other_test_its_own() -> None:
    pytest.importorskip("xdist")
    scheduler = conftest.pytest_xdist_make_scheduler(_Config("loadgroup"), None)  # type: ignore[arg-type]
    split = scheduler._split_scope
    for module in conftest.ONE_WORKER_MODULES:
        assert (ROOT / module).is_file(), module  # (a renamed module would be spread)
        assert split(f"{module}::test_a[x]") == split(f"{module}::test_b") == module
    other = "tests/test_compile.py::test_a[x]"
    assert split(other) == other


def test_another_dist_mode_is_left_to_xdist() -> None:
    assert conftest.pytest_xdist_make_scheduler(_Config("loadfile"), None) is None  # type: ignore[arg-type]
