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
from typing import Any

import keras
import numpy as np

from cifar_exp import evaluation
from cifar_exp.config import TrainConfig
from cifar_exp.data import Splits
from cifar_exp.models import build, fine_tune

EpochHook = Callable[[int, Mapping[str, float]], None]
PREDICT_BATCH = 1024


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class CustomModel:
    """A classifier built elsewhere (a KerasTuner hypermodel): ``build()`` returns a compiled
    model from float images in [0, 1] to class probabilities; ``fit``, if given, replaces
    ``keras.Model.fit`` (called as ``fit(model, x, y, **kwargs)``)."""

    build: Callable[[], keras.Model]
    fit: Callable[..., Any] | None = None


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


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Smith's one-cycle policy as PyTorch's ``OneCycleLR`` shapes it: linear warmup from
    ``peak / 25`` to ``peak`` over ``warmup_fraction`` of the steps, then cosine annealing to
    ``peak / 1e4`` at the last step."""

    START_DIV, END_DIV = 25.0, 1e4

    def __init__(self, peak: float, total_steps: int, warmup_fraction: float) -> None:
        self.peak = peak
        self.total_steps = total_steps
        self.warmup_fraction = warmup_fraction

    def __call__(self, step):  # type: ignore[no-untyped-def]
        ops = keras.ops
        step = ops.cast(step, "float32")
        start, end = self.peak / self.START_DIV, self.peak / self.END_DIV
        warmup = max(1.0, self.warmup_fraction * self.total_steps)
        rising = start + (self.peak - start) * step / warmup
        done = ops.clip((step - warmup) / max(1.0, self.total_steps - 1 - warmup), 0.0, 1.0)
        falling = end + (self.peak - end) * 0.5 * (1.0 + ops.cos(math.pi * done))
        return ops.where(step < warmup, rising, falling)

    def get_config(self) -> dict[str, float]:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_fraction": self.warmup_fraction}


def learning_rate(cfg: TrainConfig, epochs: int, steps_per_epoch: int):  # type: ignore[no-untyped-def]
    """The learning rate (a float or a Keras schedule over optimizer steps) for ``cfg``, over
    ``epochs`` epochs; it starts from (or peaks at) ``cfg.peak_learning_rate``. ``plateau`` is
    a constant here: ``callbacks`` lowers it."""
    schedules = keras.optimizers.schedules
    lr, total = cfg.peak_learning_rate, max(1, epochs * steps_per_epoch)
    if cfg.lr_schedule == "step":
        # e.g. 3 stages: lr, lr*0.1, lr*0.01 over three equal thirds of training. Keras'
        # boundaries are inclusive (step <= b takes the earlier value), hence the - 1.
        boundaries = [round(total * i / cfg.step_stages) - 1 for i in range(1, cfg.step_stages)]
        values = [lr * cfg.step_factor**i for i in range(cfg.step_stages)]
        return schedules.PiecewiseConstantDecay(boundaries, values)
    if cfg.lr_schedule == "exponential":
        return schedules.ExponentialDecay(lr, decay_steps=steps_per_epoch, decay_rate=cfg.decay_rate)
    if cfg.lr_schedule == "cosine":
        return schedules.CosineDecay(lr, decay_steps=total)
    if cfg.lr_schedule == "cosine_warmup":
        warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
        return schedules.CosineDecay(0.0, decay_steps=total - warmup, warmup_target=lr, warmup_steps=warmup)
    if cfg.lr_schedule == "one_cycle":
        return OneCycle(lr, total, cfg.warmup_fraction)
    return lr


def optimizer(cfg: TrainConfig, epochs: int, steps_per_epoch: int,
              rate: float | None = None) -> keras.optimizers.Optimizer:
    """``cfg``'s optimizer with its learning-rate schedule, or the constant ``rate`` if given."""
    lr = learning_rate(cfg, epochs, steps_per_epoch) if rate is None else rate
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamax":
        return keras.optimizers.Adamax(lr)
    return keras.optimizers.Adam(lr)


def callbacks(cfg: TrainConfig) -> list[keras.callbacks.Callback]:
    """Callbacks the configuration needs besides the hooks (they run after the hooks: the
    plateau rule lowers the rate of the next epoch, not the one logged)."""
    if cfg.lr_schedule == "plateau":
        return [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=cfg.plateau_factor,
                                                  patience=cfg.plateau_patience, min_lr=0.0, verbose=0)]
    return []


def _schedule(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.schedules.LearningRateSchedule | None:
    """The optimizer's per-step schedule, None for a constant (or plateau-set) rate."""
    schedule = getattr(optimizer, "_learning_rate", None)
    return schedule if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) else None


class _Hooks(keras.callbacks.Callback):
    """Adds ``learning_rate``, ``epoch_seconds`` and ``images_per_second`` (``images`` trained per
    epoch over the epoch's seconds, validation included) to the logs, stops on a non-finite loss, then calls
    the hooks. Calls ``on_first_step`` once, with the seconds from ``started`` (a
    ``time.perf_counter`` value) until the first training step was compiled and launched: the
    begin of the second batch (or the end of a one-batch epoch).

    ``learning_rate`` is the rate of the epoch's first step; a per-step schedule also logs
    ``learning_rate_last``, the rate of its last step. (Read after the epoch, the optimizer's rate
    is the next epoch's: a step schedule at 1e-3 logged 1e-4, 1e-5, 1e-5 while it trained at
    1e-3, 1e-4, 1e-5.)

    Decision: no batch-end hook, which would make Keras wait for every step's result (it
    dispatches steps asynchronously only while no callback overrides ``on_train_batch_end``)."""

    def __init__(self, hooks: Sequence[EpochHook], images: int, started: float | None = None,
                 on_first_step: Callable[[float], None] | None = None) -> None:
        super().__init__()
        self.hooks = hooks
        self.images = images
        self.started = time.perf_counter() if started is None else started
        self.epoch_started = 0.0
        self.epoch_rate = 0.0
        self.on_first_step = on_first_step

    def _first_step(self) -> None:
        hook, self.on_first_step = self.on_first_step, None  # once per training, both phases included
        if hook is not None:
            hook(time.perf_counter() - self.started)

    def on_train_batch_begin(self, batch, logs=None):  # type: ignore[no-untyped-def]
        if batch == 1:
            self._first_step()

    def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        self.epoch_started = time.perf_counter()
        self.epoch_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))  # the next step's

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        self._first_step()
        logs = logs if logs is not None else {}
        logs["learning_rate"] = self.epoch_rate
        schedule = _schedule(self.model.optimizer)
        if schedule is not None:  # the step just taken, the epoch's last
            last = keras.ops.maximum(self.model.optimizer.iterations - 1, 0)
            logs["learning_rate_last"] = float(keras.ops.convert_to_numpy(schedule(last)))
        logs["epoch_seconds"] = time.perf_counter() - self.epoch_started
        logs["images_per_second"] = self.images / logs["epoch_seconds"]
        if not math.isfinite(float(logs.get("loss", 0.0))):
            raise Diverged(f"loss is {logs.get('loss')} at epoch {epoch}")
        for hook in self.hooks:
            hook(epoch, {k: float(v) for k, v in logs.items()})


class FullBatches(keras.utils.PyDataset):
    """The training images in full batches only: each epoch a fresh permutation (a NumPy generator
    seeded with ``seed``), cut into ``len(x) // batch_size`` batches; the remainder of the
    permutation (under one batch, different images each epoch) is left out of that epoch. Data of
    fewer images than one batch is one batch of all of them.

    Decision: every step has the same shape, so the train step compiles once. Keras' array input
    ends each epoch with a partial batch, a second shape and, under JAX, a second compilation of
    the whole train step in every trial: one epoch of 1,800 images at batch 256 of the lr_dropout
    CNN made 2 XLA compilations (21.36 s compiling, JAX on the 2-core CPU machine), these batches
    1 (7.93 s). Used under JAX only: TensorFlow's trainer relaxes shapes itself, and this class
    made its epochs slower there (3 epochs of 1,800 images: 18.2, 12.7, 21.9 s against 13.9, 9.1,
    9.0 s with arrays, same machine)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x))
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[batch], self.y[batch]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))


def train(cfg: TrainConfig, data: Splits, *, epochs: int, seed: int,
          on_epoch: Sequence[EpochHook] = (), stop_after: int | None = None,
          custom: CustomModel | None = None, on_first_step: Callable[[float], None] | None = None,
          started: float | None = None) -> TrainResult:
    """Train ``cfg`` on ``data.x_train`` for ``epochs``, validating on ``data.x_val`` each epoch,
    then evaluate the final model on ``data.x_test``. A transfer model with ``fine_tune_epochs``
    trains its last epochs with the top backbone layers unfrozen (``models.fine_tune``).
    ``stop_after`` ends training after that many epochs of an ``epochs``-long run (the
    learning-rate schedule still spans ``epochs``): how a rerun replays a trial that was pruned.
    With ``custom``, its model replaces ``cfg``'s (``cfg`` still gives batch size and augmentation)
    and trains as it was compiled. ``on_first_step`` receives, once, the seconds from ``started``
    (a ``time.perf_counter()`` value; default: this call) until the first training step was
    compiled and launched. Seeds Python, NumPy and the backend with ``seed`` first: the same
    arguments in the same process mode (see ``backend.use_deterministic_ops``) give the same
    numbers. Raises ``Diverged`` on a non-finite loss, and whatever a hook raises."""
    started = time.perf_counter() if started is None else started
    keras.utils.set_random_seed(seed)
    num_classes = len(data.class_names)
    classifier = custom.build() if custom else None
    train_model, model = build(cfg, num_classes, seed=seed, classifier=classifier, images=data.x_train)
    # Transfer learning's optional second phase takes the last fine_tune_epochs of the budget.
    second = min(cfg.fine_tune_epochs, epochs) if cfg.model == "transfer" and not custom else 0
    last = epochs if stop_after is None else min(stop_after, epochs)
    compiled, labels = _labelling(classifier, num_classes)
    history: dict[str, list[float]] = {}
    # Under JAX full batches only (see FullBatches); else Keras' array input, its last batch partial.
    batches = FullBatches(data.x_train, labels(data.y_train), cfg.batch_size, seed) \
        if keras.backend.backend() == "jax" and not (custom is not None and custom.fit is not None) else None
    steps_per_epoch = len(batches) if batches is not None else math.ceil(len(data.x_train) / cfg.batch_size)
    hooks = _Hooks(on_epoch, len(batches) * batches.batch_size if batches is not None else len(data.x_train),
                   started, on_first_step)

    def fit(opt: keras.optimizers.Optimizer | None, first_epoch: int, end_epoch: int) -> None:
        if compiled is not None:
            train_model.compile_from_config(compiled)
        else:
            train_model.compile(optimizer=opt, metrics=["accuracy"],
                                loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing))
        kwargs = dict(initial_epoch=first_epoch, epochs=end_epoch, verbose=0,
                      validation_data=(data.x_val, labels(data.y_val)),
                      callbacks=[hooks, *callbacks(cfg)])
        if custom is not None and custom.fit is not None:  # KerasTuner's contract: arrays in
            logged = custom.fit(train_model, data.x_train, labels(data.y_train), shuffle=True, **kwargs)
        elif batches is not None:
            logged = train_model.fit(batches, **kwargs)
        else:
            logged = train_model.fit(data.x_train, labels(data.y_train), batch_size=cfg.batch_size, shuffle=True,
                                     **kwargs)
        for key, values in logged.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)

    if epochs - second > 0:
        fit(None if compiled else optimizer(cfg, epochs - second, steps_per_epoch), 0, min(last, epochs - second))
    if last > epochs - second:
        fine_tune(train_model, cfg.fine_tune_layers)
        # A new optimizer: its state would belong to the first phase's trainable weights.
        fit(optimizer(cfg, second, steps_per_epoch, rate=cfg.fine_tune_learning_rate), epochs - second, last)
    y_prob = np.asarray(model.predict(data.x_test, batch_size=PREDICT_BATCH, verbose=0))
    return TrainResult(history=history, **evaluation.test_metrics(y_prob, data.y_test, cfg.label_smoothing),
                       y_prob=y_prob, model=model)


def _labelling(classifier: keras.Model | None, num_classes: int) -> tuple[dict[str, Any] | None, Callable[..., Any]]:
    """A hypermodel's compile config (``None`` without one) and how labels are fed: one-hot, as
    label smoothing needs them (the sparse loss has no smoothing), or class indices for a
    custom model compiled with a sparse loss."""
    compiled = classifier.get_compile_config() if classifier is not None else None
    if classifier is not None and not compiled:
        raise ValueError("the hypermodel returned a model that is not compiled: compile it in build(hp), "
                         "as KerasTuner requires")
    if compiled is not None and "sparse" in str(compiled.get("loss")).lower():
        return compiled, lambda y: y
    return compiled, lambda y: np.eye(num_classes, dtype=np.float32)[y]
