"""The documentation's code runs: README snippet, docs examples, example scripts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_snippet_runs() -> None:
    """The poster's snippet, with a model, a loss and a batch defined around it."""
    snippet = python_blocks(ROOT / "README.md")[0]
    torch.manual_seed(0)
    namespace = {
        "model": nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)),
        "loss_func": nn.CrossEntropyLoss(),
        "X": torch.randn(4, 1, 4, 4),
        "y": torch.tensor([0, 1, 2, 0]),
    }
    exec(snippet, namespace)


@pytest.mark.parametrize(
    "block",
    [b for b in python_blocks(ROOT / "docs" / "layers.md") if b.startswith("import")],
)
def test_layers_doc_adapter_example_runs(block: str) -> None:
    namespace: dict[str, object] = {}
    exec(block, namespace)
    if "optim" in namespace:  # the custom layer was registered, stepped and got factors
        optim = namespace["optim"]
        assert "0" in optim.preconditioners  # type: ignore[attr-defined]
        assert optim.preconditioners["0"].state is not None  # type: ignore[attr-defined]
        assert optim.steps == 1  # type: ignore[attr-defined]


def test_guide_profiling_snippet_shows_the_phases(capsys: pytest.CaptureFixture[str]) -> None:
    """The profiler table of the guide's snippet lists every phase the optimizer names."""
    from singd import SINGD
    from singd.optim.base import PROFILER_LABELS

    (snippet,) = [b for b in python_blocks(ROOT / "docs" / "guide.md") if "profile()" in b]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    namespace = {
        "model": model,
        "optim": SINGD(model, T=1),
        "loss_func": nn.CrossEntropyLoss(),
        "batches": [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(2)],
    }
    exec(snippet, namespace)
    assert "Self CPU" in capsys.readouterr().out  # the snippet prints the profiler table
    # Which rows the printed table keeps depends on timing (it is sorted by time and
    # cut at 15 rows), so the phases are looked up among all the profiled events.
    events = {event.key for event in namespace["prof"].key_averages()}
    assert set(PROFILER_LABELS.values()) <= events, sorted(events)


def test_digits_example_script() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--epochs", "5"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    match = re.search(r"test accuracy (\d+\.\d)%", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) > 60.0  # five epochs already learn most digits


def test_guide_fallback_rule_snippet_runs() -> None:
    """The guide's custom fallback rule trains the parameters without factors."""
    from singd import SINGD
    from singd.optim.fallback import available_fallbacks

    (snippet,) = [b for b in python_blocks(ROOT / "docs" / "guide.md") if "register_fallback" in b]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    namespace: dict[str, object] = {"model": model, "SINGD": SINGD}
    exec(snippet, namespace)
    assert "signsgd" in available_fallbacks()  # (scoped to this test: tests/conftest.py)
    norm = model[1].weight
    before = norm.detach().clone()
    optim = namespace["optim"]
    nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
    optim.step()  # type: ignore[attr-defined]
    assert norm.grad is not None
    torch.testing.assert_close(norm.detach(), before - 1e-3 * norm.grad.sign())
