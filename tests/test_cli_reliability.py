"""The ``singd`` command refuses bad requests before it trains, without a traceback.

Issue 14, item 8 (output paths checked before training, no stray ``.tmp``) and the
command's part of item 9 (huge ``--seed``, CIFAR labels out of range, a tampered
``--resume`` file, hyper-parameters the library would refuse).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from singd.cli.train import _save_checkpoint
from tests.helpers import FAST, run_cli

#: A place nobody can write to, also as root (the tests may run as root).
UNWRITABLE = Path("/proc/singd-no-such-dir")


def assert_refused_before_training(err: str, out: str, message: str, command: str) -> None:
    assert f"singd {command}: error: {message}" in err, err
    assert "Traceback" not in err
    assert out == ""
    assert f"singd {command}: " not in err.replace(f"singd {command}: error:", "")  # no header


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: tmp, "is a folder; give a file name"),
        (lambda tmp: tmp / "file" / "run.pt", "file' is a file, not a folder"),
        (lambda tmp: UNWRITABLE / "run.pt", "cannot be written"),
    ],
    ids=["folder", "under-a-file", "unwritable"],
)
def test_train_checks_save_before_training(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    make_path: Callable[[Path], Path],
    message: str,
) -> None:
    (tmp_path / "file").write_text("")
    path = make_path(tmp_path)
    status, out, err = run_cli(capsys, "train", *FAST, "--epochs", "1", "--save", str(path))
    assert status == 2
    assert_refused_before_training(err, out, f"--save {str(path)!r} ", "train")
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no stray .tmp


def test_a_failed_checkpoint_write_leaves_no_tmp_file(tmp_path: Path) -> None:
    class Trainer:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    folder = tmp_path / "run.pt"
    folder.mkdir()  # os.replace(tmp, folder) fails
    with pytest.raises(OSError):
        _save_checkpoint(folder, Trainer(), {}, {}, 1, [])  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_compare_checks_out_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "compare", *FAST, "--epochs", "1", "--out", str(UNWRITABLE))
    assert status == 2
    assert_refused_before_training(err, out, f"--out {str(UNWRITABLE)!r} cannot be used", "compare")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_huge_seed_is_an_argument_error(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, command, "--seed", str(2**70))
    assert exit_info.value.code == 2
    assert "expected a seed in [0, 2**64 - 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--damping", "1000"], "β₁(λ − 1) = 99.9; it must be below 2"),
        (["--optimizer", "ingd", "--lr-cov", "1.6"], "lr_cov (β₁) must be below 1.5"),
        (["--optimizer", "kfac", "--lr-cov", "1.5"], "lr_cov (β₁) must be a number in [0, 1]"),
    ],
)
def test_library_bounds_refuse_before_training(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run_cli(capsys, "train", *FAST, "--epochs", "1", *argv)
    assert status == 2
    assert_refused_before_training(err, out, "", "train")
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--momentum", "1.5"], "momentum (α₂) must be a number in [0, 1), got 1.5"),
        (["--alpha1", "2"], "alpha1 (α₁) must be a number in [0, 1), got 2.0"),
        (["--damping", "0"], "damping (λ) must be a number > 0, got 0.0"),
        (["--lr-cov", "1e30"], "lr_cov (β₁) must be a number in [0, 2), got 1e+30"),
        (["--lr", "-1"], "lr (β₂) must be a number ≥ 0, got -1.0"),
        (["--lr", "fast"], "expected a number ≥ 0, got 'fast'"),
        (["--T", "0"], "T must be an integer ≥ 1, got 0"),
        (["--lr", "nan"], "lr (β₂) must be a number ≥ 0, got nan"),
    ],
)
def test_hyperparameter_options_use_the_library_bounds(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "train", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cifar_labels_out_of_range_are_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.helpers import write_fake_cifar10

    folder = write_fake_cifar10(tmp_path)
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": [0] * 7 + [10]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    status, out, err = run_cli(
        capsys, "train", *FAST, "--dataset", "cifar10", "--data-dir", str(tmp_path)
    )
    assert status == 2
    assert_refused_before_training(err, out, "", "train")
    assert "data_batch_3': 1 of its 8 labels are outside 0…9 (the first is 10, of image 7)" in err


# --- tampered --resume files ------------------------------------------------------------


def _tamper_settings(ckpt: dict[str, Any]) -> None:
    ckpt["settings"]["optimizer"] = "lbfgs"


def _tamper_epoch(ckpt: dict[str, Any]) -> None:
    ckpt["epoch"] = "one"


def _tamper_model_nan(ckpt: dict[str, Any]) -> None:
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name] * float("nan")


def _tamper_model_shape(ckpt: dict[str, Any]) -> None:
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(1)


def _tamper_optimizer_lr(ckpt: dict[str, Any]) -> None:
    ckpt["optimizer"]["param_groups"][0]["lr"] = -1.0


def _tamper_optimizer_layers(ckpt: dict[str, Any]) -> None:
    ckpt["optimizer"]["singd"]["layers"].popitem()


def _tamper_hyperparameters(ckpt: dict[str, Any]) -> None:
    ckpt["hyperparameters"] = {"momentum": "high"}


def _tamper_history(ckpt: dict[str, Any]) -> None:
    ckpt["history"] = [1, 2]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_tamper_settings, "setting 'optimizer' must be one of sgd, adamw"),
        (_tamper_epoch, "'epoch' must be a int, found str"),
        (_tamper_model_nan, "holds inf/NaN"),
        (_tamper_model_shape, "does not fit this run"),
        (_tamper_optimizer_lr, "does not fit this run (damaged or edited?): Param group 0"),
        (_tamper_optimizer_layers, "does not fit this run"),
        (_tamper_hyperparameters, "momentum (α₂) must be a number in [0, 1), got 'high'"),
        (_tamper_history, "'history' must be a list of rows"),
    ],
    ids=lambda v: v.__name__.removeprefix("_tamper_") if callable(v) else "",
)
def test_a_tampered_resume_file_is_refused_without_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tamper: Callable[..., None], message: str
) -> None:
    ckpt_path = tmp_path / "run.pt"
    assert run_cli(capsys, "train", *FAST, "--epochs", "1", "--save", str(ckpt_path))[0] == 0
    ckpt = torch.load(ckpt_path, weights_only=True)
    tamper(ckpt)
    torch.save(ckpt, ckpt_path)
    status, out, err = run_cli(capsys, "train", *FAST, "--epochs", "2", "--resume", str(ckpt_path))
    assert status == 2
    assert "singd train: error: " in err and "Traceback" not in err
    assert message in err, err
    assert out == ""
