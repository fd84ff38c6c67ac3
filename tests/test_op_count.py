"""The operation counter of ``benchmarks/op_count.py`` (deterministic counts, issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import op_count
from singd.cli.optimizers import OptimizerSpec


def test_counter_reproduces_the_published_reference_counts() -> None:
    """SGD's and AdamW's training steps on the issue's CNN: the figures the issue quotes
    (so the method counts what the issue's table counted)."""
    cnn = op_count.SCENARIOS["cnn"]
    assert op_count.count(cnn, OptimizerSpec("sgd"), 1).train_step == 129
    assert op_count.count(cnn, OptimizerSpec("adamw"), 1).train_step == 227


def test_host_reads_are_counted_whether_or_not_they_dispatch() -> None:
    counter = op_count.OpCounter()
    t = torch.ones(3)
    with counter, op_count.counting_host_reads(counter, exempt=set()) as reads:
        t.sum().item()
        bool(t.sum() > 0)
        t.tolist()
        float(t[0])
        t.add(1)
    assert sorted(reads) == sorted(["item", "__bool__", "tolist", "__float__"])
    assert counter.scalar_reads == 0  # the dispatched reads belong to the counted methods
    with counter:
        torch.ops.aten._local_scalar_dense(t[0])
    assert counter.scalar_reads == 1


def test_accelerator_code_path_is_forced_and_restored() -> None:
    from singd.structures import _linalg

    X = torch.ones(2, 2)
    with op_count.accelerator_code_path():
        assert not _linalg.splits_work(X)
    assert _linalg.splits_work(X)


def test_report_plumbing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "ops.md"
    argv = ["--scenarios", "mlp24", "--optimizers", "sgd", "--T", "1", "2"]
    argv += ["--no-progress", "--out", str(out)]
    assert op_count.main(argv) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "| SGD (foreach) |" in text and "step() T=2" in text
