"""Smoke and error-path tests of the ``singd`` command and the ``benchmarks`` scripts.

The command runs in-process through :func:`singd.cli.main` with tiny budgets (large
batches, one epoch, one timed round); one test runs the installed console script.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from singd.cli import main
from singd.cli.measure import (
    interleaved_times,
    optimizer_state_bytes,
    parameter_bytes,
    unique_storage_bytes,
)
from singd.cli.optimizers import OptimizerSpec, every_structure, usable_structures
from singd.cli.report import Column, markdown_table, to_json
from tests.helpers import FAST, run_cli, write_fake_cifar10

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


#: Fast settings shared by the training commands: 6 steps per digits epoch, no bar.
#: The CLI's default device is "auto" (CUDA when present); these tests pin the CPU, whose
#: output they describe (on a GPU, memory is the allocator's peak and runs use bf16).
@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_png_by_matplotlib(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert b"Matplotlib" in data[:200], f"{path} was not written by matplotlib"
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


# --- help and argument errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ([], ["train", "compare", "overhead", "--version"]),
        (["train"], ["--optimizer", "--structure", "--precision", "--save", "--resume", "--T"]),
        (["compare"], ["--quick", "--optimizers", "--structures", "--precisions", "--out"]),
        (["overhead"], ["--quick", "--rounds", "--T", "--width", "--precision", "--format"]),
    ],
)
def test_help_explains_every_option(
    capsys: pytest.CaptureFixture[str], command: list[str], options: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lr", "-1"], "lr (β₂) must be a number ≥ 0, got -1.0"),
        (["train", "--lr", "fast"], "expected a number ≥ 0, got 'fast'"),
        (["train", "--momentum", "1.5"], "must be a number in [0, 1)"),
        (["train", "--epochs", "0"], "expected a positive integer"),
        (["train", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["train", "--structure", "nonsense"], "unknown structure 'nonsense'; valid: "),
        (["train", "--device", "tpu"], "unknown device 'tpu'"),
        (["compare", "--format", "xml"], "invalid choice: 'xml'"),
        (["compare", "--precisions", "float8"], "invalid choice: 'float8'"),
        (["overhead", "--T", "0"], "expected a positive integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_options_are_explained(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer", "sgd", "--damping", "0.1"], "sgd does not take damping"),
        (["--optimizer", "adamw", "--structure", "diagonal"], "Only the singd optimizer"),
        (["--dataset", "cifar10"], "cifar10 is not bundled"),
        (["--resume", "missing.pt"], "--resume: no checkpoint at"),
    ],
)
def test_inconsistent_requests_fail_with_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run_cli(capsys, "train", *FAST, *argv)
    assert status == 2
    assert f"singd train: error: {message}" in err
    assert out == ""


def test_missing_cifar_folder_names_the_expected_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, _, err = run_cli(
        capsys, "train", *FAST, "--dataset", "cifar100", "--data-dir", str(tmp_path)
    )
    assert status == 2
    assert "cifar100 not found" in err
    assert "cifar-100-python" in err and "never downloads" in err


# --- train ------------------------------------------------------------------------------


def test_train_prints_a_row_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "train", *FAST, "--epochs", "2")
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0].split("|")[1:-1] == [
        " epoch ",
        " train loss ",
        " test loss ",
        " test acc [%] ",
        " ms/step ",
    ]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1", "2"]
    assert "SINGD-diagonal on digits (float32, cpu)" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--optimizer", "adamw", "--precision", "bfloat16"],
        ["--optimizer", "kfac", "--precision", "bf16-autocast"],
        ["--optimizer", "ingd", "--T", "2", "--lr", "0.02"],
    ],
)
def test_train_json_for_optimizers_and_precisions(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    status, out, _ = run_cli(capsys, "train", *FAST, "--epochs", "1", "--format", "json", *argv)
    assert status == 0
    report = json.loads(out)
    assert report["settings"]["optimizer"] == argv[1]
    (row,) = report["rows"]
    assert 0.0 <= row["test_accuracy"] <= 100.0
    assert row["ms_per_step"] > 0


def test_resume_continues_exactly_like_an_uninterrupted_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ckpt = tmp_path / "run.pt"
    common = [*FAST, "--format", "json", "--optimizer", "singd", "--structure", "dense"]
    status, out, _ = run_cli(capsys, "train", *common, "--epochs", "2")
    assert status == 0
    straight = json.loads(out)["rows"]

    status, _, _ = run_cli(capsys, "train", *common, "--epochs", "1", "--save", str(ckpt))
    assert status == 0
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and saved["settings"]["structure"] == "dense"
    # Settings come from the checkpoint: no --optimizer/--structure needed.
    status, out, _ = run_cli(
        capsys, "train", *FAST, "--format", "json", "--epochs", "2", "--resume", str(ckpt)
    )
    assert status == 0
    resumed = json.loads(out)["rows"]
    assert [r["epoch"] for r in resumed] == [1, 2]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert resumed[1][key] == straight[1][key]


def test_resume_rejects_contradicting_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ckpt = tmp_path / "run.pt"
    assert run_cli(capsys, "train", *FAST, "--epochs", "1", "--save", str(ckpt))[0] == 0
    status, _, err = run_cli(
        capsys, "train", *FAST, "--resume", str(ckpt), "--optimizer", "sgd", "--lr", "0.1"
    )
    assert status == 2
    assert "contradict the checkpoint" in err
    assert "--optimizer sgd (checkpoint: singd)" in err


def test_resume_rejects_foreign_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    status, _, err = run_cli(capsys, "train", *FAST, "--resume", str(path))
    assert status == 2
    assert "is not a checkpoint of `singd train`" in err


def test_train_on_local_cifar10(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    status, out, _ = run_cli(
        capsys,
        "train",
        *FAST,
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--format",
        "csv",
    )
    assert status == 0
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["epoch"] == "1"
    assert float(row["test_accuracy"]) in {100.0 * k / 8 for k in range(9)}


def test_cifar_files_cannot_run_code(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = write_fake_cifar10(tmp_path)

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    status, out, err = run_cli(
        capsys, "train", *FAST, "--dataset", "cifar10", "--data-dir", str(tmp_path)
    )
    assert status == 2
    assert "is not a CIFAR file in the python format: Refusing to load builtins.print" in err
    assert "pwned" not in out


# --- compare ----------------------------------------------------------------------------


def test_compare_writes_plots_and_parseable_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = run_cli(
        capsys,
        "compare",
        *FAST,
        "--epochs",
        "1",
        "--optimizers",
        "sgd",
        "kfac",
        "singd",
        "--structures",
        "diagonal",
        "--out",
        str(tmp_path),
        "--format",
        "json",
    )
    assert status == 0
    report = json.loads(out)
    rows = {(r["optimizer"], r["precision"]): r for r in report["rows"]}
    labels = ("SGD", "KFAC", "SINGD-diagonal")
    assert set(rows) == {(o, p) for o in labels for p in ("float32", "bfloat16")}
    for precision in ("float32", "bfloat16"):
        assert rows["SGD", precision]["time_ratio"] == 1.0
        assert rows["SGD", precision]["memory_ratio"] == 1.0
    # bfloat16 halves every byte of parameters and state.
    assert rows["SGD", "bfloat16"]["memory_kib"] == rows["SGD", "float32"]["memory_kib"] / 2
    for name in ("loss_curves.png", "accuracy_vs_time.png"):
        assert_png_by_matplotlib(tmp_path / name)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["curves"]) == 6
    assert all(len(c["losses"]) == 6 for c in saved["curves"])
    assert "wrote" in err


def test_compare_table_has_a_row_per_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, _ = run_cli(
        capsys,
        "compare",
        *FAST,
        "--epochs",
        "1",
        "--optimizers",
        "sgd",
        "adamw",
        "--precisions",
        "float32",
        "--out",
        str(tmp_path),
    )
    assert status == 0
    lines = out.strip().splitlines()
    assert "| optimizer" in lines[0] and "memory ×SGD" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["SGD", "AdamW"]


def test_compare_refuses_an_output_path_that_is_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, out, err = run_cli(capsys, "compare", *FAST, "--epochs", "1", "--out", str(blocker))
    assert status == 2
    assert "cannot be used as a folder" in err
    assert out == ""


@pytest.mark.slow
def test_compare_quick_finishes_within_90_seconds(tmp_path: Path) -> None:
    start = time.perf_counter()
    assert (
        main(["compare", "--quick", "--no-progress", "--device", "cpu", "--out", str(tmp_path)])
        == 0
    )
    assert time.perf_counter() - start < 90
    assert_png_by_matplotlib(tmp_path / "loss_curves.png")


# --- overhead ---------------------------------------------------------------------------


def test_overhead_lists_the_posters_methods(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--rounds", "1", "--warmup", "0", "--T", "2", "--width", "0.25", "--batch-size", "4"]
    tiny += ["--threads", "1", "--device", "cpu"]
    status, out, _ = run_cli(capsys, "overhead", *tiny, "--no-progress", "--format", "json")
    assert status == 0
    report = json.loads(out)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["SGD", "AdamW", "SINGD-Diag", "IKFAC", "INGD", "KFAC (fp32)"]
    assert rows["KFAC (fp32)"]["poster_time_ratio"] == 4.49
    assert rows["KFAC (fp32)"]["precision"] == "float32"
    assert rows["SGD"]["memory_ratio"] == rows["SGD"]["time_ratio"] == 1.0
    # Dense factors need more memory than diagonal ones.
    assert rows["INGD"]["memory_ratio"] > rows["SINGD-Diag"]["memory_ratio"]
    assert "saved activations" in report["memory"]


# --- console script and benchmark ---------------------------------------------------


def test_console_script_is_installed() -> None:
    exe = shutil.which("singd")
    assert exe is not None, "the `singd` console script is missing: pip install -e '.[cli]'"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("singd ")


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_benchmark_quick_mode_writes_markdown(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, clock: str
) -> None:
    from benchmarks import step_time as bench

    out = tmp_path / "bench.md"
    argv = ["--quick", "--repeats", "1", "--scenarios", "mlp", "--optimizers", "sgd", "singd"]
    argv += ["--structures", "diagonal", "--T", "1", "10", "--no-progress", "--out", str(out)]
    assert bench.main([*argv, "--clock", clock]) == 0
    assert torch.get_num_threads() == 1
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "## mlp: MLP 784-512-512-10, batch 128" in text
    assert "| SINGD-diagonal |" in text and "×SGD T=10" in text
    assert f", {bench.CLOCK_NAMES[clock]}; median of 1 rounds" in text


def test_interleaved_times_reads_the_given_clock() -> None:
    """Each duration is the given clock's advance over one call, round-robin after the
    warm-up calls (which are not timed)."""
    ticks = iter(range(0, 1000, 1))
    calls: list[str] = []
    rounds = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleaved_times(rounds, 2, warmup=1, clock=lambda: float(next(ticks)) ** 2)
    assert calls == ["a", "b"] * 3
    # clock readings 0,1 | 4,9 | 16,25 | 36,49: squares of successive ticks
    assert times == {"a": [1.0, 9.0], "b": [5.0, 13.0]}


def test_benchmark_refuses_the_cpu_clock_on_an_accelerator(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import step_time as bench

    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--clock", "cpu", "--device", "cuda"])
    assert "--clock cpu times the host thread only" in capsys.readouterr().err


def test_in_place_step_benchmark_times_both_steps_and_restores_the_guard(
    tmp_path: Path,
) -> None:
    """benchmarks/in_place_step.py times the shipped step() against the out-of-place one
    and leaves the step guard as shipped."""
    from benchmarks import in_place_step
    from singd.optim.guard import StepGuard

    shipped = StepGuard.writes_in_place
    out = tmp_path / "in_place.md"
    argv = ["--scenarios", "tokens", "--optimizers", "singd:diagonal", "--rounds", "1"]
    assert in_place_step.main([*argv, "--out", str(out)]) == 0
    assert StepGuard.writes_in_place is shipped
    row = next(line for line in out.read_text().splitlines() if "SINGD-diagonal" in line)
    in_place_ms, out_of_place_ms, ratio = (float(v) for v in row.strip("| ").split("|")[2:])
    assert in_place_ms > 0 and out_of_place_ms > 0 and ratio > 0


def test_large_models_quick_mode(tmp_path: Path) -> None:
    """benchmarks/large_models.py (a GPU benchmark) runs its CPU-sized stand-in."""
    from benchmarks import large_models

    out = tmp_path / "large.md"
    argv = ["--quick", "--scenarios", "gpt2", "--optimizers", "sgd", "singd"]
    argv += ["--structures", "diagonal", "--T", "1", "--repeats", "1", "--no-progress"]
    assert large_models.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "## gpt2: GPT-2 shape" in text and "| SINGD-diagonal |" in text
    # the quick model is GPT-2-shaped: tied head, equal blocks
    model = large_models.GPT2Shaped(97, 32, 32, 2, 2)
    assert model.head.weight is model.tokens.weight and len(model.blocks) == 2


def test_step_breakdown_reads_the_profiler_ranges() -> None:
    """The breakdown benchmark finds every phase the optimizer names (non-zero times)."""
    argv = ["--scenario", "tokens", "--structures", "diagonal", "block30diagonal"]
    argv += ["--T", "1", "--repeats", "1", "--profiled-rounds", "1", "--no-progress"]
    stdout = run_benchmark("step_breakdown.py", *argv)
    rows = [line for line in stdout.splitlines() if line.startswith("| SINGD-")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        statistics, refresh, precondition = (float(c) for c in cells[3:6])
        assert statistics > 0 and refresh > 0 and precondition > 0, row


def test_vs_published_plumbing_with_this_package_on_both_sides() -> None:
    """benchmarks/vs_published.py with this package standing in for the published one:
    the same code gives exactly equal trajectories, and the row that emulates the
    published block-diagonal orientation differs (K is not symmetric after a few steps)."""
    stdout = run_benchmark(
        "vs_published.py", "--published-python", sys.executable, "--what", "trajectories"
    )
    cells = {}
    for line in stdout.splitlines():
        label, net, *values = [c.strip() for c in line.strip("|").split("|")] + ["", ""]
        if net in ("MLP", "CNN"):
            cells[label, net] = [float(v) for v in values if v]
    assert len(cells) == 14
    for (label, _), values in cells.items():
        if "emulated" in label:
            assert max(values) > 1e-6, (label, values)
        else:
            assert values == [0.0] * 4, (label, values)
    settings = stdout[stdout.index("| setting | T=1 | T=2 |") :].splitlines()[2:]
    assert len(settings) == 15
    assert all(line.endswith("| 0.0e+00 | 0.0e+00 |") for line in settings), settings


def _in_git_checkout() -> bool:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True)
    return result.returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason="needs the git history of a checkout")
@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_vs_revision_interleaves_two_source_trees(clock: str) -> None:
    """benchmarks/vs_revision.py against HEAD: both workers time the same optimizers
    (each from its own tree; the worker refuses any other), SGD is every version's
    reference, the paired ratios are positive numbers, and the report names its clock."""
    argv = ["--base", "HEAD", "--scenarios", "mlp", "--optimizers", "singd", "--clock", clock]
    stdout = run_benchmark(
        "vs_revision.py",
        *argv,
        "--structures",
        "diagonal",
        "--T",
        "1",
        "--repeats",
        "1",
        "--no-progress",
    )
    rows = {
        cells[0]: cells[1:]
        for line in stdout.splitlines()
        if line.startswith("| S") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    assert set(rows) == {"SGD", "SINGD-diagonal"}, stdout
    assert f"({clock} clock: " in stdout
    base_ms, this_ms, ratio, base_sgd, this_sgd = (float(c) for c in rows["SINGD-diagonal"])
    assert base_ms > 0 and this_ms > 0 and ratio > 0
    assert rows["SGD"][3:] == ["1.00", "1.00"]
    sgd_base, sgd_this = float(rows["SGD"][0]), float(rows["SGD"][1])
    assert base_sgd == pytest.approx(base_ms / sgd_base, abs=0.01)
    assert this_sgd == pytest.approx(this_ms / sgd_this, abs=0.01)


@pytest.mark.skipif(not _in_git_checkout(), reason="needs the git history of a checkout")
def test_vs_revision_names_a_bad_revision() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vs_revision.py"), "--base", "no-such-rev"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "git archive no-such-rev" in result.stderr


def run_benchmark(script: str, *argv: str) -> str:
    """Run ``benchmarks/<script>`` in a fresh interpreter; its stdout (it must succeed)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- helpers ------------------------------------------------------------------------------


def test_structures_that_do_not_parse_are_skipped() -> None:
    assert usable_structures(["diagonal", "not_a_structure", "diagonal()", "dense"]) == [
        "diagonal",
        "dense",
    ]
    assert {"dense", "diagonal"} <= set(every_structure())


def test_state_bytes_walk_every_tensor_once() -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == parameter_bytes(model) == 4 * (12 + 3)
    t = torch.zeros(10)
    assert unique_storage_bytes([t, t[:5], t]) == 40


def test_optimizer_spec_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="Valid: sgd, adamw"):
        OptimizerSpec("lbfgs")
    with pytest.raises(ValueError, match="needs a structure"):
        OptimizerSpec("singd")


def test_table_and_json_rendering() -> None:
    rows = [{"name": "a", "value": 1.23456}, {"name": "bb", "value": float("nan")}]
    table = markdown_table(rows, [Column("name", "name"), Column("value", "value", ".2f")])
    assert table.splitlines() == [
        "| name | value |",
        "| ---- | ----: |",
        "| a    |  1.23 |",
        "| bb   |   nan |",
    ]
    assert json.loads(to_json(rows))[1]["value"] is None


def test_python_dash_m_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "singd.cli", "overhead", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "poster" in result.stdout
