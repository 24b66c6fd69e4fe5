"""One training run from plain values: build, compile, fit, evaluate on the test set.

Imports neither optuna nor mlflow: the sweep observes training through ``on_epoch`` hooks that
receive the epoch number and the Keras ``logs`` (plus ``learning_rate`` and ``epoch_seconds``).
A hook may raise to stop training (pruning does); the exception propagates out of ``train``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np

from cifar_exp.config import TrainConfig
from cifar_exp.data import Splits
from cifar_exp.models import build

EpochHook = Callable[[int, Mapping[str, float]], None]
PREDICT_BATCH = 1024


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished run returns; ``history`` maps each Keras logs key to its per-epoch values."""

    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    y_prob: np.ndarray  # (n_test, n_classes) probabilities of the final model
    model: keras.Model  # the inference model (uint8 images in, probabilities out)

    @property
    def y_pred(self) -> np.ndarray:
        return self.y_prob.argmax(axis=1)


def learning_rate(cfg: TrainConfig, epochs: int, steps_per_epoch: int):  # type: ignore[no-untyped-def]
    """The learning rate (a float or a Keras schedule over optimizer steps) for ``cfg``."""
    schedules = keras.optimizers.schedules
    lr, total = cfg.learning_rate, max(1, epochs * steps_per_epoch)
    if cfg.lr_schedule == "step":
        # e.g. 3 stages: lr, lr*0.1, lr*0.01 over three equal thirds of training. Keras'
        # boundaries are inclusive (step <= b takes the earlier value), hence the - 1.
        boundaries = [round(total * i / cfg.step_stages) - 1 for i in range(1, cfg.step_stages)]
        values = [lr * cfg.step_factor**i for i in range(cfg.step_stages)]
        return schedules.PiecewiseConstantDecay(boundaries, values)
    if cfg.lr_schedule == "exponential":
        return schedules.ExponentialDecay(lr, decay_steps=steps_per_epoch, decay_rate=cfg.decay_rate)
    if cfg.lr_schedule == "cosine":
        warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
        if warmup:
            return schedules.CosineDecay(0.0, decay_steps=total - warmup, warmup_target=lr,
                                         warmup_steps=warmup)
        return schedules.CosineDecay(lr, decay_steps=total)
    return lr


def optimizer(cfg: TrainConfig, epochs: int, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    lr = learning_rate(cfg, epochs, steps_per_epoch)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamax":
        return keras.optimizers.Adamax(lr)
    return keras.optimizers.Adam(lr)


class _Hooks(keras.callbacks.Callback):
    """Adds ``learning_rate`` and ``epoch_seconds`` to the logs, stops on a non-finite loss,
    then calls the hooks."""

    def __init__(self, hooks: Sequence[EpochHook]) -> None:
        super().__init__()
        self.hooks = hooks
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        logs = logs if logs is not None else {}
        # The rate the optimizer used in this epoch's last step (schedules are per step).
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["epoch_seconds"] = time.perf_counter() - self.started
        if not math.isfinite(float(logs.get("loss", 0.0))):
            raise Diverged(f"loss is {logs.get('loss')} at epoch {epoch}")
        for hook in self.hooks:
            hook(epoch, {k: float(v) for k, v in logs.items()})


def cross_entropy(y_prob: np.ndarray, y_true: np.ndarray, label_smoothing: float) -> float:
    """Keras' categorical cross-entropy (same clipping and label smoothing) computed in numpy,
    so that the test set is passed through the model once, by ``predict``."""
    classes = y_prob.shape[1]
    target = np.eye(classes, dtype=np.float64)[y_true] * (1 - label_smoothing) + label_smoothing / classes
    eps = keras.config.epsilon()
    return float(np.mean(-np.sum(target * np.log(np.clip(y_prob, eps, 1 - eps)), axis=1)))


def train(cfg: TrainConfig, data: Splits, *, epochs: int, seed: int,
          on_epoch: Sequence[EpochHook] = (), stop_after: int | None = None) -> TrainResult:
    """Train ``cfg`` on ``data.x_train`` for ``epochs``, validating on ``data.x_val`` each epoch,
    then evaluate the final model on ``data.x_test``. ``stop_after`` ends training after that
    many epochs of an ``epochs``-long run (the learning-rate schedule still spans ``epochs``):
    how a rerun replays a trial that was pruned.

    Seeds Python, NumPy and the backend with ``seed`` first: the same arguments in the same
    process mode (see ``backend.use_deterministic_ops``) give the same numbers. Raises
    ``Diverged`` on a non-finite loss, and whatever a hook raises.
    """
    keras.utils.set_random_seed(seed)
    num_classes = len(data.class_names)
    train_model, model = build(cfg, num_classes, seed=seed)
    steps_per_epoch = math.ceil(len(data.x_train) / cfg.batch_size)
    train_model.compile(
        optimizer=optimizer(cfg, epochs, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    # One-hot labels: label smoothing needs them (the sparse loss has no smoothing).
    one_hot = np.eye(num_classes, dtype=np.float32)
    history = train_model.fit(
        data.x_train, one_hot[data.y_train], batch_size=cfg.batch_size,
        epochs=epochs if stop_after is None else min(stop_after, epochs),
        validation_data=(data.x_val, one_hot[data.y_val]), shuffle=True, verbose=0,
        callbacks=[_Hooks(on_epoch)],
    )
    y_prob = np.asarray(model.predict(data.x_test, batch_size=PREDICT_BATCH, verbose=0))
    return TrainResult(
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        test_loss=cross_entropy(y_prob, data.y_test, cfg.label_smoothing),
        test_accuracy=float(np.mean(y_prob.argmax(axis=1) == data.y_test)),
        y_prob=y_prob,
        model=model,
    )
