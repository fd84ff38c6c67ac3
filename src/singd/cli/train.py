"""``singd train``: train a CNN on digits or CIFAR with one optimizer, save and resume.

Checkpoints (``--save``) are written after every epoch and hold only tensors and
plain values (model and optimizer ``state_dict``, the run's settings, the epoch
and the per-epoch history), so ``--resume`` reads them with
``torch.load(weights_only=True)``. The mini-batch order depends only on the seed
and the epoch, so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from singd.cli.data import DATASETS, DatasetError, load_dataset
from singd.cli.models import image_cnn
from singd.cli.optimizers import (
    DEFAULT_HYPERPARAMETERS,
    OPTIMIZERS,
    OptimizerSpec,
    build_optimizer,
)
from singd.cli.options import (
    CLIError,
    add_hyperparameter_options,
    add_run_options,
    apply_threads,
    check_output_file,
    hyperparameter_overrides,
    positive_int,
    seed_int,
    structure_name,
)
from singd.cli.report import Column, render
from singd.cli.runs import PRECISIONS, Precision, Trainer

#: Marks a file as a checkpoint of ``singd train``.
CHECKPOINT_FORMAT = "singd-cli-train/1"

#: Settings a run is made of, with their defaults (``--resume`` takes them from the file).
SETTINGS: dict[str, Any] = {
    "dataset": "digits",
    "optimizer": "singd",
    "structure": None,  # "diagonal" for singd, None for the others
    "precision": "float32",
    "batch_size": 64,
    "seed": 0,
}

COLUMNS = (
    Column("epoch", "epoch"),
    Column("train_loss", "train loss", ".4f"),
    Column("test_loss", "test loss", ".4f"),
    Column("test_accuracy", "test acc [%]", ".2f"),
    Column("ms_per_step", "ms/step", ".2f"),
)


def _defaults_epilog() -> str:
    lines = ["tuned defaults (digits CNN):"]
    for name, hp in DEFAULT_HYPERPARAMETERS.items():
        lines.append(f"  {name:6s} " + ", ".join(f"{k}={v:g}" for k, v in hp.items()))
    lines += [
        "",
        textwrap.fill(
            "precision: 'float32'; 'bfloat16' = pure bf16 (parameters, activations and "
            "optimizer state); 'bf16-autocast' = float32 parameters, bf16 forward pass "
            "(torch.autocast) and bf16 Kronecker factors, as in the paper."
        ),
        "",
        "examples:",
        "  singd train --optimizer singd --structure diagonal --epochs 10",
        "  singd train --optimizer kfac --precision bfloat16 --save run.pt",
        "  singd train --resume run.pt --epochs 20",
        "  singd train --dataset cifar10 --data-dir ~/data --optimizer adamw",
    ]
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the ``singd`` parser's subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train a CNN on digits (bundled) or CIFAR (local) with one optimizer",
        description=textwrap.fill(
            "Train a CNN with one optimizer; print train loss, test accuracy and "
            "ms/step per epoch. Digits ship with scikit-learn (nothing is downloaded); CIFAR is "
            "read from --data-dir."
        ),
        epilog=_defaults_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("what to train")
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        help="'digits' (8×8, bundled with scikit-learn; default), 'cifar10' or 'cifar100' "
        "(python version, read from --data-dir)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        help="folder with the extracted CIFAR files (cifar-10-batches-py/ or "
        "cifar-100-python/, or the folder itself)",
    )
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default: singd)")
    group.add_argument(
        "--structure",
        type=structure_name,
        help="structure of SINGD's factors K and C, e.g. diagonal, block30diagonal, "
        "hierarchical15_15, triltoeplitz, dense (default: diagonal; singd only)",
    )
    group.add_argument(
        "--precision", choices=PRECISIONS, help="float32 (default), bfloat16 or bf16-autocast"
    )
    group.add_argument(
        "--epochs", type=positive_int, default=10, help="total epochs to train (default: 10)"
    )
    group.add_argument("--batch-size", type=positive_int, help="mini-batch size (default: 64)")
    group.add_argument(
        "--seed", type=seed_int, help="seed of initialisation and batch order (default: 0)"
    )
    add_hyperparameter_options(parser)
    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument(
        "--save", type=Path, metavar="CKPT", help="write a checkpoint here after every epoch"
    )
    ckpt.add_argument(
        "--resume",
        type=Path,
        metavar="CKPT",
        help="continue a saved run up to --epochs; its settings are used, and options that "
        "contradict them are an error",
    )
    add_run_options(parser)
    parser.set_defaults(run=run)
    return parser


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CLIError(f"--resume: no checkpoint at {str(path)!r}.")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise CLIError(f"--resume: cannot read {str(path)!r} as a checkpoint: {error}") from error
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CLIError(f"--resume: {str(path)!r} is not a checkpoint of `singd train`.")
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise CLIError(f"--resume: {str(path)!r} is damaged or was edited: {problem}.")
    return ckpt


#: What each part of a checkpoint must be: (type, check of the value, what it must be).
_SETTING_CHECKS: dict[str, tuple[Any, Any, str]] = {
    "dataset": (str, DATASETS.__contains__, f"one of {', '.join(DATASETS)}"),
    "optimizer": (str, OPTIMIZERS.__contains__, f"one of {', '.join(OPTIMIZERS)}"),
    "structure": ((str, type(None)), lambda v: True, "a structure name or None"),
    "precision": (str, PRECISIONS.__contains__, f"one of {', '.join(PRECISIONS)}"),
    "batch_size": (int, lambda v: v >= 1, "a positive integer"),
    "seed": (int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64 - 1]"),
}


def _checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with the parts of a checkpoint (None if nothing)."""
    kinds = {
        "settings": dict,
        "hyperparameters": dict,
        "epoch": int,
        "model": dict,
        "optimizer": dict,
        "history": list,
    }
    for key, kind in kinds.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            return f"{key!r} must be a {kind.__name__}, found {type(ckpt.get(key)).__name__}"
    for key, (kind, valid, what) in _SETTING_CHECKS.items():
        value = ckpt["settings"].get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or not valid(value):
            return f"setting {key!r} must be {what}, found {value!r}"
    if ckpt["epoch"] < 0:
        return f"'epoch' must be ≥ 0, found {ckpt['epoch']}"
    if not all(isinstance(row, dict) for row in ckpt["history"]):
        return "'history' must be a list of rows (dicts)"
    for name, value in ckpt["model"].items():
        if not isinstance(value, torch.Tensor):
            return f"model entry {name!r} must be a tensor, found {type(value).__name__}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"model tensor {name!r} holds inf/NaN"
    return None


def resolve_settings(
    args: argparse.Namespace, saved: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, float]]:
    """The run's settings and hyper-parameter overrides: defaults ← checkpoint ← options.

    Raises:
        CLIError: If an option contradicts the checkpoint.
    """
    given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    overrides = hyperparameter_overrides(args)
    if saved is None:
        settings = {**SETTINGS, **given}
    else:
        settings = dict(saved["settings"])
        conflicts = [
            f"--{k.replace('_', '-')} {v} (checkpoint: {settings[k]})"
            for k, v in given.items()
            if v != settings[k]
        ]
        saved_hp = saved["hyperparameters"]
        conflicts += [
            f"--{k.replace('_', '-')} {v} (checkpoint: {saved_hp.get(k, 'default')})"
            for k, v in overrides.items()
            if saved_hp.get(k) != v
        ]
        if conflicts:
            raise CLIError(
                "These options contradict the checkpoint being resumed: "
                + "; ".join(conflicts)
                + ". Leave them out (the checkpoint's settings are used) or start a new run."
            )
        overrides = dict(saved_hp)
    if settings["optimizer"] == "singd" and settings["structure"] is None:
        settings["structure"] = "diagonal"
    return settings, overrides


def run(args: argparse.Namespace) -> int:
    """Run ``singd train``; returns the exit status.

    Raises:
        CLIError: For missing data, inconsistent options or unreadable checkpoints.
    """
    apply_threads(args)
    device = args.device
    if args.save is not None:
        check_output_file(args.save, "--save")  # fail before training, not after
    saved = _load_checkpoint(args.resume, device) if args.resume is not None else None
    settings, overrides = resolve_settings(args, saved)
    try:
        spec = OptimizerSpec(settings["optimizer"], settings["structure"], overrides)
    except (TypeError, ValueError) as error:
        where = " (in the --resume checkpoint)" if saved is not None else ""
        raise CLIError(f"{error}{where}") from error
    try:
        data = load_dataset(settings["dataset"], args.data_dir)
    except DatasetError as error:
        raise CLIError(str(error)) from error
    precision = Precision(settings["precision"])
    torch.manual_seed(settings["seed"])
    trainer = Trainer(
        image_cnn(data.image_shape, data.num_classes),
        lambda m: build_optimizer(spec, m, preconditioner_dtype=precision.preconditioner_dtype),
        data,
        precision,
        device,
        settings["batch_size"],
        settings["seed"],
    )
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if saved is not None:
        try:
            trainer.model.load_state_dict(saved["model"])
            trainer.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            raise CLIError(
                f"--resume: {str(args.resume)!r} does not fit this run (damaged or edited?): "
                f"{error}"
            ) from error
        history = [dict(row) for row in saved["history"]]
        start_epoch = int(saved["epoch"])
        trainer.steps = start_epoch * trainer.steps_per_epoch()
    print(
        f"singd train: {spec.label} on {data.name} ({precision.name}, {device}), "
        f"epochs {start_epoch + 1}–{args.epochs}",
        file=sys.stderr,
    )
    total = max(0, args.epochs - start_epoch) * trainer.steps_per_epoch()
    with tqdm(total=total, unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        for epoch in range(start_epoch, args.epochs):
            bar.set_description(f"epoch {epoch + 1}/{args.epochs}")
            seconds_before = trainer.train_seconds
            losses = []
            for loss in trainer.epoch(epoch):
                losses.append(loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}")
            test_loss, accuracy = trainer.test()
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": sum(losses) / len(losses),
                    "test_loss": test_loss,
                    "test_accuracy": 100.0 * accuracy,
                    "ms_per_step": 1000.0 * (trainer.train_seconds - seconds_before) / len(losses),
                }
            )
            if args.save is not None:
                try:
                    _save_checkpoint(args.save, trainer, settings, overrides, epoch + 1, history)
                except OSError as error:
                    raise CLIError(
                        f"--save: writing {str(args.save)!r} after epoch {epoch + 1} failed: "
                        f"{error.strerror or error} (a checkpoint written before is intact)."
                    ) from error
    print(
        render(
            history,
            COLUMNS,
            args.format,
            json_extra={
                "optimizer": spec.label,
                "settings": settings,
                "hyperparameters": spec.resolved(),
            },
        )
    )
    return 0


def _save_checkpoint(
    path: Path,
    trainer: Trainer,
    settings: dict[str, Any],
    overrides: dict[str, float],
    epoch: int,
    history: list[dict[str, Any]],
) -> None:
    """Write the checkpoint atomically (a crash never leaves half a file)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "settings": settings,
        "hyperparameters": overrides,
        "epoch": epoch,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no stray half-written file
        raise
