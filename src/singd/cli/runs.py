"""Training runs: precision modes, one training step, evaluation, and a full run.

Precision modes (``--precision``):

* ``float32`` — everything in float32;
* ``bfloat16`` — *pure* bfloat16: parameters, activations, gradients and optimizer
  state are bfloat16 (the loss is computed from float32 logits). SINGD's factors
  follow the weights' dtype, so they are bfloat16 too, and KFAC's statistics are
  bfloat16 (its inversion still runs in float32);
* ``bf16-autocast`` — mixed precision: float32 parameters and optimizer state,
  the forward pass under ``torch.autocast(dtype=torch.bfloat16)``, and the
  Kronecker factors (SINGD's K, C, m_K, m_C; KFAC's statistics) stored in bfloat16,
  as in the paper's experiments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from singd.cli.data import Dataset, epoch_batches
from singd.cli.measure import optimizer_state_bytes, parameter_bytes, synchronize
from singd.cli.models import image_cnn
from singd.cli.optimizers import OptimizerSpec, build_optimizer

#: Names accepted by :class:`Precision`.
PRECISIONS = ("float32", "bfloat16", "bf16-autocast")


@dataclasses.dataclass(frozen=True)
class Precision:
    """A precision mode (module docstring).

    Raises:
        ValueError: For an unknown name.
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"Unknown precision {self.name!r}. Valid: {', '.join(PRECISIONS)}.")

    @property
    def param_dtype(self) -> torch.dtype:
        """Dtype of the parameters (and inputs)."""
        return torch.bfloat16 if self.name == "bfloat16" else torch.float32

    @property
    def preconditioner_dtype(self) -> torch.dtype | None:
        """Dtype of the Kronecker factors; None follows the weights."""
        return torch.bfloat16 if self.name == "bf16-autocast" else None

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager[None]:
        """The forward-pass context: ``torch.autocast`` for ``bf16-autocast``, else nothing."""
        if self.name != "bf16-autocast":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; other names as given.

    Raises:
        ValueError: If CUDA is asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: PyTorch sees no CUDA device")
    return device


def classification_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy in float32; logits ``[B, classes]`` or ``[B, L, classes]``."""
    return F.cross_entropy(logits.float().flatten(0, -2), y.flatten())


def train_step(
    model: nn.Module,
    optimizer: Optimizer,
    X: Tensor,
    y: Tensor,
    precision: Precision,
    loss_func: Callable[[Tensor, Tensor], Tensor] = classification_loss,
) -> Tensor:
    """One step: zero_grad, forward, backward, ``optimizer.step()``; returns the loss.

    The loss is returned as a detached tensor, so calling it does not wait for the
    device.
    """
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast(X.device):
        logits = model(X)
    loss = loss_func(logits, y)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(
    model: nn.Module, X: Tensor, y: Tensor, precision: Precision, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(X, y)``."""
    total_loss = 0.0
    correct = 0
    for start in range(0, len(X), batch_size):
        xb = X[start : start + batch_size]
        yb = y[start : start + batch_size]
        with precision.autocast(xb.device):
            logits = model(xb)
        total_loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    return total_loss / len(X), correct / len(X)


@dataclasses.dataclass
class EvalPoint:
    """Test accuracy after ``step`` steps and ``seconds`` of training (evaluation excluded)."""

    step: int
    seconds: float
    accuracy: float


@dataclasses.dataclass
class RunResult:
    """The outcome of one training run.

    Attributes:
        label: Optimizer display name (``"SINGD-diagonal"``).
        precision: Precision mode name.
        losses: Training loss of every step's mini-batch.
        evals: Test accuracy during training.
        train_seconds: Wall time of the training steps (evaluations excluded).
        final_loss: Mean loss on the whole training set at the end.
        test_accuracy: Test accuracy at the end.
        param_bytes: Parameter bytes.
        state_bytes: Optimizer-state bytes (:func:`~singd.cli.measure.optimizer_state_bytes`).
        diverged: Whether training stopped at a non-finite loss.
    """

    label: str
    precision: str
    losses: list[float]
    evals: list[EvalPoint]
    train_seconds: float
    final_loss: float
    test_accuracy: float
    param_bytes: int
    state_bytes: int
    diverged: bool = False

    @property
    def steps(self) -> int:
        """Number of steps taken."""
        return len(self.losses)

    @property
    def ms_per_step(self) -> float:
        """Mean wall time of a step in milliseconds (refresh steps included)."""
        return 1000.0 * self.train_seconds / max(1, self.steps)

    @property
    def memory_bytes(self) -> int:
        """Parameters + optimizer state."""
        return self.param_bytes + self.state_bytes


class Trainer:
    """A model, its optimizer and a dataset on a device, trained epoch by epoch.

    Args:
        model: The model (moved to the device and the precision's dtype here).
        optimizer_factory: Builds the optimizer for the moved model.
        data: The dataset (moved to the device once).
        precision: The precision mode.
        device: Where to train.
        batch_size: Mini-batch size.
        seed: Seed of the mini-batch order.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: Callable[[nn.Module], Optimizer],
        data: Dataset,
        precision: Precision,
        device: torch.device,
        batch_size: int,
        seed: int,
    ) -> None:
        self.model = model.to(device=device, dtype=precision.param_dtype)
        self.optimizer = optimizer_factory(self.model)
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        dtype = precision.param_dtype
        self.X_train = data.X_train.to(device=device, dtype=dtype)
        self.y_train = data.y_train.to(device)
        self.X_test = data.X_test.to(device=device, dtype=dtype)
        self.y_test = data.y_test.to(device)
        self.steps = 0
        self.train_seconds = 0.0

    def steps_per_epoch(self) -> int:
        """Mini-batches per epoch."""
        return math.ceil(len(self.X_train) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[float]:
        """Train one epoch, yielding each step's mini-batch loss.

        Only the steps count towards :attr:`train_seconds`; whatever the caller
        does between two yields (evaluation, progress bars) does not.
        """
        for batch in epoch_batches(len(self.X_train), self.batch_size, self.seed, epoch):
            batch = batch.to(self.device)
            synchronize(self.device)
            start = time.perf_counter()
            loss = train_step(
                self.model, self.optimizer, self.X_train[batch], self.y_train[batch], self.precision
            )
            value = float(loss)  # waits for the device
            self.train_seconds += time.perf_counter() - start
            self.steps += 1
            yield value

    def test(self) -> tuple[float, float]:
        """Test loss and accuracy."""
        return evaluate(self.model, self.X_test, self.y_test, self.precision)

    def train_loss(self) -> float:
        """Mean loss on the whole training set."""
        return evaluate(self.model, self.X_train, self.y_train, self.precision)[0]


class Run:
    """One optimizer's training run on a fresh :func:`~singd.cli.models.image_cnn`.

    The model is initialised from ``seed``, so runs with the same seed start from
    the same weights and see the same mini-batches. Runs advance one step at a time
    (:meth:`epoch_steps`), so :func:`train_interleaved` can alternate between them.

    Args:
        spec: The optimizer.
        data: The dataset.
        precision: The precision mode.
        batch_size: Mini-batch size.
        seed: Seed of initialisation and batch order.
        device: Where to train.
        evals_per_epoch: Test-accuracy evaluations per epoch (for the time plot).
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        data: Dataset,
        precision: Precision,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        evals_per_epoch: int = 4,
    ) -> None:
        self.spec = spec
        self.precision = precision
        torch.manual_seed(seed)
        self.trainer = Trainer(
            image_cnn(data.image_shape, data.num_classes),
            lambda m: build_optimizer(spec, m, preconditioner_dtype=precision.preconditioner_dtype),
            data,
            precision,
            device,
            batch_size,
            seed,
        )
        self.every = max(1, self.trainer.steps_per_epoch() // max(1, evals_per_epoch))
        self.losses: list[float] = []
        self.evals = [EvalPoint(0, 0.0, self.trainer.test()[1])]
        self.diverged = False

    def epoch_steps(self, epoch: int) -> Iterator[None]:
        """Train one epoch, yielding after every step; stops for good at a non-finite loss."""
        if self.diverged:
            return
        for loss in self.trainer.epoch(epoch):
            self.losses.append(loss)
            if not math.isfinite(loss):
                self.diverged = True
                return
            if self.trainer.steps % self.every == 0:
                self._evaluate()
            yield

    def _evaluate(self) -> float:
        accuracy = self.trainer.test()[1]
        self.evals.append(EvalPoint(self.trainer.steps, self.trainer.train_seconds, accuracy))
        return accuracy

    def result(self) -> RunResult:
        """The run's :class:`RunResult` (evaluates the final model)."""
        last = self.evals[-1]
        accuracy = last.accuracy if last.step == self.trainer.steps else self._evaluate()
        return RunResult(
            label=self.spec.label,
            precision=self.precision.name,
            losses=self.losses,
            evals=self.evals,
            train_seconds=self.trainer.train_seconds,
            final_loss=float("nan") if self.diverged else self.trainer.train_loss(),
            test_accuracy=accuracy,
            param_bytes=parameter_bytes(self.trainer.model),
            state_bytes=optimizer_state_bytes(self.trainer.optimizer),
            diverged=self.diverged,
        )


def train_interleaved(
    runs: Sequence[Run], epochs: int, on_step: Callable[[], None] | None = None
) -> list[RunResult]:
    """Train every run for ``epochs``, one step of each in turn (round-robin).

    Alternating at every step spreads slow phases of the machine (other processes,
    frequency changes) evenly over the runs, so their ms/step stay comparable.
    """
    done = object()
    for epoch in range(epochs):
        active = [run.epoch_steps(epoch) for run in runs]
        while active:
            still = []
            for steps in active:
                if next(steps, done) is not done:
                    still.append(steps)
                    if on_step is not None:
                        on_step()
            active = still
    return [run.result() for run in runs]


def run_training(
    spec: OptimizerSpec,
    data: Dataset,
    precision: Precision,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    evals_per_epoch: int = 4,
    on_step: Callable[[], None] | None = None,
) -> RunResult:
    """Train a fresh :func:`~singd.cli.models.image_cnn` with ``spec`` alone (see :class:`Run`)."""
    run = Run(
        spec,
        data,
        precision,
        batch_size=batch_size,
        seed=seed,
        device=device,
        evals_per_epoch=evals_per_epoch,
    )
    return train_interleaved([run], epochs, on_step)[0]
