"""Datasets of the ``singd`` command: bundled digits, local CIFAR, random tensors.

Nothing here downloads anything:

* ``digits`` — scikit-learn's bundled handwritten digits (1797 images of 8×8 pixels,
  10 classes), split 75/25 into train/test with a fixed stratified split;
* ``cifar10`` / ``cifar100`` — read from a folder in the *python* format as it is
  distributed (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``;
  ``cifar-100-python/`` with ``train`` and ``test``). The files are pickles; they
  are read with an unpickler that only accepts NumPy arrays, lists and plain values,
  so a tampered file cannot run code.
* :func:`random_batch` — random images and labels of a given shape, for measuring
  cost (``singd overhead``, ``benchmarks/step_time.py``).
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "cifar10", "cifar100")

#: Per-channel mean and standard deviation of the CIFAR training images (in [0, 1]).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: Folder name, training files, test file and label key of each CIFAR variant.
_CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        b"labels",
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", b"fine_labels"),
}


class DatasetError(Exception):
    """A dataset cannot be loaded (missing or unreadable files)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset that must be read from disk is not where the user said."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory as tensors.

    Attributes:
        name: ``"digits"``, ``"cifar10"``, ``"cifar100"`` or ``"random"``.
        X_train: Training images, ``[N, C, H, W]`` float32, normalised.
        y_train: Training labels, ``[N]`` int64.
        X_test: Test images.
        y_test: Test labels.
        num_classes: Number of classes.
    """

    name: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        C, H, W = self.X_train.shape[1:]
        return int(C), int(H), int(W)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name (see :data:`DATASETS`).

    Args:
        name: ``"digits"``, ``"cifar10"`` or ``"cifar100"``.
        data_dir: Folder holding the CIFAR files (ignored for digits).

    Returns:
        The dataset.

    Raises:
        ValueError: For an unknown name.
        DatasetNotFoundError: If a CIFAR folder is missing or incomplete.
        DatasetError: If a CIFAR file is not in the expected format.
    """
    if name == "digits":
        return load_digits()
    if name in _CIFAR_LAYOUT:
        if data_dir is None:
            raise DatasetNotFoundError(
                f"{name} is not bundled: download the python version from "
                "https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass the folder "
                "with --data-dir."
            )
        return load_cifar(name, data_dir)
    raise ValueError(f"Unknown dataset {name!r}. Valid: {', '.join(DATASETS)}.")


def load_digits() -> Dataset:
    """scikit-learn's bundled 8×8 digits, pixels scaled to [0, 1], a fixed 75/25 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    X = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    # A fixed split (random_state=0): seeds change initialisation and order, not the data.
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y
    )
    return Dataset("digits", X_train, y_train, X_test, y_test, num_classes=10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers, and refuses every other class."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3's protocol 2 stores bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name}: a CIFAR file only holds arrays and lists."
            )
        return super().find_class(module, name)


def _read_cifar_file(path: Path, label_key: bytes, num_classes: int) -> tuple[Tensor, Tensor]:
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        images = torch.as_tensor(batch[b"data"]).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(batch[label_key], dtype=torch.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DatasetError(f"{str(path)!r} is not a CIFAR file in the python format: {e}") from e
    if labels.shape != (len(images),):
        raise DatasetError(
            f"{str(path)!r} holds {len(images)} images but {tuple(labels.shape)} labels."
        )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise DatasetError(
            f"{str(path)!r}: {int(bad.sum())} of its {len(labels)} labels are outside "
            f"0…{num_classes - 1} (the first is {int(labels[first])}, of image {first}); is "
            "this the right dataset?"
        )
    return images, labels


def cifar_folder(name: str, data_dir: str | Path) -> Path:
    """The folder holding ``name``'s files: ``data_dir`` itself or its standard subfolder.

    Raises:
        DatasetNotFoundError: If neither holds every file (the message says which).
    """
    folder_name, train_files, test_file, _ = _CIFAR_LAYOUT[name]
    root = Path(data_dir).expanduser()
    candidates = [root / folder_name, root]
    for folder in candidates:
        if all((folder / f).is_file() for f in (*train_files, test_file)):
            return folder
    raise DatasetNotFoundError(
        f"{name} not found in {str(root)!r}: expected the files {', '.join(train_files)} and "
        f"{test_file} in {str(candidates[0])!r} or {str(root)!r}. Download the python version "
        "from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there (the command "
        "never downloads anything)."
    )


def load_cifar(name: str, data_dir: str | Path) -> Dataset:
    """CIFAR-10/100 from local files, normalised per channel.

    Raises:
        DatasetNotFoundError: If the files are missing.
        DatasetError: If a file is not in the expected format.
    """
    folder = cifar_folder(name, data_dir)
    _, train_files, test_file, label_key = _CIFAR_LAYOUT[name]
    num_classes = 10 if name == "cifar10" else 100
    parts = [_read_cifar_file(folder / f, label_key, num_classes) for f in train_files]
    X_train = torch.cat([images for images, _ in parts])
    y_train = torch.cat([labels for _, labels in parts])
    X_test, y_test = _read_cifar_file(folder / test_file, label_key, num_classes)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in _CIFAR_STATS[name])

    def normalise(images: Tensor) -> Tensor:
        return (images.float() / 255.0 - mean) / std

    return Dataset(name, normalise(X_train), y_train, normalise(X_test), y_test, num_classes)


def random_batch(
    batch_size: int,
    shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Standard-normal inputs ``[batch_size, *shape]`` and uniform labels (for cost only).

    ``shape`` may have one entry (vectors), three (images) or a sequence length and a
    feature size, in which case labels are per position: ``[batch_size, L]``.
    """
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(batch_size, *shape, generator=generator)
    label_shape = (batch_size, shape[0]) if len(shape) == 2 else (batch_size,)
    y = torch.randint(num_classes, label_shape, generator=generator)
    return X.to(device), y.to(device)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Shuffled index batches of one epoch (the last may be smaller).

    The order depends only on ``(seed, epoch)``, so a run resumed from a checkpoint
    at an epoch boundary sees exactly the batches of an uninterrupted run.
    """
    generator = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return list(torch.randperm(num_samples, generator=generator).split(batch_size))
