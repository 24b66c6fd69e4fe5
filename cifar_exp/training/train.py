"""One training run from plain values: build, compile, fit, evaluate on the test set.

Imports neither optuna nor mlflow: the sweep observes training through Keras callbacks, which
receive each epoch's Keras ``logs`` (plus ``learning_rate``, ``epoch_seconds`` and
``images_per_second``) at ``on_epoch_end``; an ``Observer`` also hears the first launched step
and a resumed checkpoint's epochs. A callback may raise to stop training (pruning does); the
exception propagates out of ``train``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np

from cifar_exp.config import TrainConfig
from cifar_exp.data import Splits
from cifar_exp.metrics import test_metrics
from cifar_exp.training import checkpoints, layers, optimizers
from cifar_exp.training import feed as feeds
from cifar_exp.training.best import BestEpoch, assign
from cifar_exp.training.clock import Clock
from cifar_exp.training.models import build, fine_tune
from cifar_exp.training.programs import Program, Programs, structure

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
    y_prob: np.ndarray  # (n_test, n_classes) probabilities of the kept model
    model: keras.Model  # the inference model (uint8 images in, probabilities out), stock layers only
    kept_epoch: int = 0  # the index of the epoch whose weights the model holds: the best by ``best_by``, or the last
    # "new": its programs were compiled for it; "cache": read from JAX's persistent compilation
    # cache (none compiled); "reused": a program a previous trial of the worker compiled.
    compiled: str = "new"
    feed: str = "fit"  # how its batches reached the model: "fit" or "device" (``feed``)
    # Seconds by phase: build_seconds, compile_seconds (0 when reused), fit_seconds (training and validation,
    # compilation excluded), predict_seconds (the test pass), model_seconds (the copy of the model to log).
    phases: dict[str, float] = field(default_factory=dict)
    compilations: int | None = None  # XLA programs compiled (JAX; None under TensorFlow)


class Observer(keras.callbacks.Callback):
    """A Keras callback that also hears two moments Keras has no hook for (both no-ops here;
    override them, or pass functions as ``keras.callbacks.LambdaCallback`` takes its hooks):

    - ``on_first_step(seconds)``, once per ``train``: the seconds from ``TrainOptions.started``
      until the first training step was compiled and launched;
    - ``on_resume(history)``: the metrics (a list per logs key) of the epochs a resumed checkpoint
      holds, before training goes on; callbacks do not see those epochs' ``on_epoch_end`` again."""

    def __init__(self, on_first_step: Callable[[float], None] | None = None,
                 on_resume: Callable[[Mapping[str, list[float]]], None] | None = None, **hooks: Any) -> None:
        super().__init__()
        for name, hook in {"on_first_step": on_first_step, "on_resume": on_resume, **hooks}.items():
            if hook is not None:
                setattr(self, name, hook)

    def on_first_step(self, seconds: float) -> None:
        """The seconds from the run's start to its first launched training step."""

    def on_resume(self, history: Mapping[str, list[float]]) -> None:
        """The metrics of the epochs a resumed checkpoint holds."""


@dataclass(frozen=True)
class TrainOptions:
    """How ``train`` runs, besides what it trains (all optional; the defaults train from scratch).

    ``stop_after`` ends training after that many epochs of an ``epochs``-long run (the schedule
    still spans ``epochs``): how a rerun replays a pruned trial. ``custom``'s model replaces
    ``cfg``'s (``cfg`` still gives batch size and augmentation) and trains as it was compiled.
    ``started`` (``time.perf_counter()``; default: the call) is when the run began, for
    ``Observer.on_first_step``. With ``programs`` (a worker's), a program an earlier trial of the
    same structure compiled trains this one, with a fresh build's numbers bit for bit; ``clock``
    times the phases. With ``checkpoint`` (ignored for a ``custom`` model), the state is saved
    there after every epoch (``checkpoints``); one there from the same run and owner is resumed:
    training goes on after its last epoch, and the result is the uninterrupted run's. With
    ``best_by`` (a logs key, a direction), the test pass and model are the epoch's best by it
    (``TrainResult.kept_epoch``); ``feeding``, see ``feed.choose``."""

    stop_after: int | None = None
    custom: CustomModel | None = None
    started: float | None = None
    programs: Programs | None = None
    clock: Clock | None = None
    checkpoint: checkpoints.Slot | None = None
    best_by: tuple[str, Literal["maximize", "minimize"]] | None = None
    feeding: Literal["auto", "fit", "device"] = "auto"


class _Hooks(keras.callbacks.Callback):
    """The first callback of every ``fit``: adds ``learning_rate``, ``epoch_seconds`` and
    ``images_per_second`` (``images`` trained per epoch over the epoch's seconds, validation
    included) to the logs the callbacks after it see, and stops on a non-finite loss. Tells each
    ``Observer`` in ``observers``, once, the seconds from ``started`` (a ``time.perf_counter``
    value) until the first training step was compiled and launched: the begin of the second batch
    (or the end of a one-batch epoch).

    ``learning_rate`` is the rate of the epoch's first step; a per-step schedule also logs
    ``learning_rate_last``, the rate of its last step. (Read after the epoch, the optimizer's rate
    is the next epoch's: a step schedule at 1e-3 logged 1e-4, 1e-5, 1e-5 while it trained at
    1e-3, 1e-4, 1e-5.)

    Decision: no batch-end hook, which would make Keras wait for every step's result (it
    dispatches steps asynchronously only while no callback overrides ``on_train_batch_end``)."""

    def __init__(self, images: int, started: float, observers: Sequence[Observer], clock: Clock) -> None:
        super().__init__()
        self.images = images
        self.started = started
        self.epoch_started = 0.0
        self.epoch_rate = 0.0
        self.observers = list(observers)
        self.first_step_at: float | None = None
        self.clock = clock

    def _first_step(self) -> None:
        observers, self.observers = self.observers, []  # once per training, both phases included
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
            self.clock.first_step(self.first_step_at)
        for observer in observers:
            observer.on_first_step(self.first_step_at - self.started)

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
        schedule = optimizers.schedule_of(self.model.optimizer)
        if schedule is not None and schedule.per_step:  # the step just taken, the epoch's last
            last = keras.ops.maximum(self.model.optimizer.iterations - 1, 0)
            logs["learning_rate_last"] = float(keras.ops.convert_to_numpy(schedule(last)))
        logs["epoch_seconds"] = time.perf_counter() - self.epoch_started
        logs["images_per_second"] = self.images / logs["epoch_seconds"]
        if not math.isfinite(float(logs.get("loss", 0.0))):
            raise Diverged(f"loss is {logs.get('loss')} at epoch {epoch}")
        logs.update((key, float(value)) for key, value in logs.items())  # what the callbacks after this one see


def train(cfg: TrainConfig, splits: Splits, *, seed: int, epochs: int,
          callbacks: Sequence[keras.callbacks.Callback] = (), options: TrainOptions = TrainOptions()) -> TrainResult:
    """Train ``cfg`` on ``splits.x_train`` for ``epochs`` (validating on ``splits.x_val`` each epoch),
    then predict ``splits.x_test`` once. A transfer model with ``fine_tune_epochs`` trains its last
    epochs with the top backbone layers unfrozen. ``callbacks`` hear every epoch trained, after
    the logs were completed (see the module) and after the checkpoint of the epoch was written
    (one that stops training there leaves it to resume from);
    those that are ``Observer``s also hear the first step and a resumed checkpoint. ``options``:
    see ``TrainOptions``. Seeds Python, NumPy, the backend with ``seed`` (same arguments: same
    numbers); raises ``Diverged``."""
    o = options  # short: read a dozen times below
    started = time.perf_counter() if o.started is None else o.started
    clock, custom = o.clock or Clock(), o.custom
    observers = [c for c in callbacks if isinstance(c, Observer)]
    keras.utils.set_random_seed(seed)
    num_classes, classifier = len(splits.class_names), (custom.build() if custom else None)
    train_model, model = build(cfg, num_classes, seed=seed, classifier=classifier, images=splits.x_train)
    # Transfer learning's optional second phase takes the last fine_tune_epochs of the budget.
    second = min(cfg.fine_tune_epochs, epochs) if cfg.model == "transfer" and not custom else 0
    last, turn = (epochs if o.stop_after is None else min(o.stop_after, epochs)), epochs - second
    compiled, labels = _labelling(classifier, num_classes, cfg.label_smoothing)
    batches, steps_per_epoch, images = _batches(cfg, splits, labels, custom, seed)
    hooks = _Hooks(images, started, observers, clock)
    first_opt = None if compiled else optimizers.optimizer(cfg, turn, steps_per_epoch)
    program = _reuse(o.programs, cfg, splits, Program(train_model, model), first_opt) if second == 0 else None
    if program is not None:
        train_model, model, clock.reused = program.train_model, program.model, True
    checkpoint = None if custom else o.checkpoint
    key, resumed = _resume(checkpoint, checkpoints.fingerprint(
        cfg, seed, epochs, (splits.x_train.shape, splits.x_val.shape), num_classes, o.best_by), observers)
    clock.lap("build_seconds")
    run = _Phases(cfg, splits, train_model, compiled, program is not None, labels, custom, batches, hooks,
                  list(callbacks), seed, checkpoint, key, resumed, o.best_by,
                  feeds.choose(o.feeding, cfg, custom is not None))
    run.fit(first_opt, 0, min(last, turn))
    if last > turn:
        fine_tune(train_model, cfg.fine_tune_layers)
        # A new optimizer: its state would belong to the first phase's trainable weights.
        run.fit(optimizers.optimizer(cfg, second, steps_per_epoch, rate=cfg.fine_tune_learning_rate),
                turn, last, phase_two=True)
    kept_epoch = run.settle(last)
    clock.lap("fit_seconds")
    y_prob = np.asarray(model.predict(splits.x_test, batch_size=PREDICT_BATCH, verbose=0))
    clock.lap("predict_seconds")
    logged = model if custom else layers.portable(model)
    clock.lap("model_seconds")
    return TrainResult(history=run.history, **test_metrics(y_prob, splits.y_test, cfg.label_smoothing),
                       y_prob=y_prob, model=logged, kept_epoch=kept_epoch, compiled=clock.origin(),
                       feed=clock.feed, phases=clock.phases,
                       compilations=clock.meter.compilations)


@dataclass
class _Phases:
    """The ``fit`` calls of one run (a phase each: transfer learning's second phase fine-tunes
    with its own optimizer), resumed after ``resumed``'s epoch if given, the metrics in ``history``."""

    cfg: TrainConfig
    data: Splits
    train_model: keras.Model
    compiled: dict[str, Any] | None  # a hypermodel's compile config
    reused: bool  # the train model is a reused program's, compiled with its optimizer
    labels: Callable[..., Any]
    custom: CustomModel | None
    batches: feeds.FullBatches | None
    hooks: _Hooks
    callbacks: list[keras.callbacks.Callback]  # the caller's, after the hooks
    seed: int
    checkpoint: checkpoints.Slot | None
    key: str
    resumed: checkpoints.State | None
    best_by: tuple[str, Literal["maximize", "minimize"]] | None = None  # the best-epoch rule, if any
    feed: feeds.Feed = "fit"  # how the batches reach the model (``feed``)
    history: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hooks.clock.feed = self.feed
        self.best = BestEpoch(*self.best_by, kept=self.resumed.kept if self.resumed else None) if self.best_by else None
        self.start = self.resumed.epoch + 1 if self.resumed is not None else 0
        self.history = {k: list(v) for k, v in self.resumed.history.items()} if self.resumed is not None else {}

    def settle(self, last: int) -> int:
        """After the last ``fit``: the train model (and the inference model, which shares its
        variables) set to the epoch kept, the best (``best``) or the last; returns its index."""
        if self.resumed is not None and self.resumed.epoch + 1 >= last:  # it died after training
            checkpoints.restore(self.train_model, self.resumed, optimizer=False)
        kept = max((len(v) for v in self.history.values()), default=1) - 1
        if self.best is not None and self.best.kept is not None and self.best.kept.epoch != kept:
            assign(self.train_model, self.best.kept.variables)
            kept = self.best.kept.epoch
        return kept

    def fit(self, opt: keras.optimizers.Optimizer | None, begin: int, end: int, phase_two: bool = False) -> None:
        """Train the phase of epochs ``begin`` to ``end`` with ``opt``, from the first epoch not in
        the checkpoint."""
        first, resumed, model = max(begin, self.start), self.resumed, self.train_model
        if first >= end:
            return
        if self.compiled is not None:
            model.compile_from_config(self.compiled)
        elif not self.reused or phase_two:
            model.compile(optimizer=opt, metrics=["accuracy"], loss=keras.losses.CategoricalCrossentropy())
        plateau = (optimizers.Plateau(self.cfg.plateau_factor, self.cfg.plateau_patience)
                   if self.cfg.lr_schedule == "plateau" else None)
        if resumed is not None and first == self.start:
            ours = resumed.epoch >= begin  # written in this phase: its optimizer and plateau rule are this phase's
            checkpoints.restore(model, resumed, optimizer=ours)
            if plateau is not None and ours and resumed.plateau is not None:
                plateau.best, plateau.wait = resumed.plateau
        # After the hooks: the plateau rule (it lowers the next epoch's rate, not the one logged),
        # the best epoch's copy, then the checkpoint of the state the next epoch starts from, and
        # only then the caller's callbacks. An engine that stops the trial at an epoch's end (an
        # interruption, pruning, the time limit) stops it with that epoch's checkpoint written:
        # with the checkpoint last, a SIGTERM that met the first epoch's end left no checkpoint,
        # and the retry trained from epoch 0 (CI, tests/test_kills.py). None of the three reads or
        # writes what the caller's callbacks see.
        after: list[keras.callbacks.Callback] = [c for c in (plateau, self.best) if c is not None]
        if self.checkpoint is not None:
            after.append(checkpoints.Writer(self.checkpoint, self.key, self.history, plateau, self.best))
        after.extend(self.callbacks)
        validation = (self.data.x_val, self.labels(self.data.y_val))
        if self.feed == "device":
            feeds.fit(model, self.data.x_train, self.labels(self.data.y_train), validation, self.cfg.batch_size,
                     self.seed, range(first, end), [self.hooks, *after], self.history)
            return
        _fit(model, self.data, self.labels, self.cfg, self.custom, self.batches, self.history, self.seed,
             initial_epoch=first, epochs=end, verbose=0, validation_data=validation, callbacks=[self.hooks, *after])


def _resume(checkpoint: checkpoints.Slot | None, key: str, observers: Sequence[Observer]
            ) -> tuple[str, checkpoints.State | None]:
    """``(key, the state to resume)``: the checkpoint's if the run ``key`` wrote it, its metrics
    handed to each observer's ``on_resume`` first."""
    resumed = checkpoints.load(checkpoint, key) if checkpoint else None
    if resumed is not None:
        for observer in observers:
            observer.on_resume(resumed.history)
    return key, resumed


def _batches(cfg: TrainConfig, data: Splits, labels: Callable[..., Any], custom: CustomModel | None,
             seed: int) -> tuple[feeds.FullBatches | None, int, int]:
    """``(batches, steps per epoch, images per epoch)``: under JAX full batches only (see
    ``feed.FullBatches``), else None: Keras' array input, its last batch partial."""
    if keras.backend.backend() == "jax" and not (custom is not None and custom.fit is not None):
        batches = feeds.FullBatches(data.x_train, labels(data.y_train), cfg.batch_size, seed)
        return batches, len(batches), len(batches) * batches.batch_size
    return None, math.ceil(len(data.x_train) / cfg.batch_size), len(data.x_train)


def _reuse(programs: Programs | None, cfg: TrainConfig, data: Splits, fresh: Program,
           optimizer: keras.optimizers.Optimizer | None) -> Program | None:
    """The program ``programs`` kept for ``cfg``'s structure, set to the state of the ``fresh``
    build and ``optimizer``; None (and ``fresh`` kept, to be compiled by its first ``fit``: a
    pruned trial's program serves as well) when there is none yet. None without ``programs`` or
    for a hypermodel's own compiled model (no ``optimizer``)."""
    if programs is None or optimizer is None:
        return None
    key = structure(cfg, (data.x_train.shape, data.x_val.shape, data.x_test.shape), len(data.class_names))
    program = programs.reuse(key, fresh.train_model, optimizer)
    if program is None:
        programs.keep(key, fresh)
    return program


def _fit(train_model: keras.Model, data: Splits, labels: Callable[..., Any], cfg: TrainConfig,
         custom: CustomModel | None, batches: feeds.FullBatches | None, history: dict[str, list[float]], seed: int,
         **kwargs: Any) -> None:
    """``fit`` on ``data``'s training images, from ``initial_epoch`` to ``epochs``, its logs appended
    to ``history``; each epoch in the order ``feed.epoch_order(seed, epoch)`` (but a custom ``fit``'s).

    Decision: Keras' own shuffle of arrays (TensorFlow's ``Dataset.shuffle``) cannot be restarted
    at epoch k, so a resumed run would see other batches than the uninterrupted one; with arrays
    each epoch is one ``fit`` call on the images in the epoch's order, unshuffled."""
    logged: list[Any] = []
    if custom is not None and custom.fit is not None:  # KerasTuner's contract: arrays in
        logged.append(custom.fit(train_model, data.x_train, labels(data.y_train), shuffle=True, **kwargs))
    elif batches is not None:
        kwargs["callbacks"].append(keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: batches.start(e)))
        logged.append(train_model.fit(batches, shuffle=False, **kwargs))  # shuffled by its own permutation
    else:
        first, end = kwargs.pop("initial_epoch"), kwargs.pop("epochs")
        for epoch in range(first, end):
            order = feeds.epoch_order(seed, epoch, len(data.x_train))
            logged.append(train_model.fit(data.x_train[order], labels(data.y_train[order]), batch_size=cfg.batch_size,
                                          shuffle=False, initial_epoch=epoch, epochs=epoch + 1, **kwargs))
    for one in logged:
        for key, values in one.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)


def _labelling(classifier: keras.Model | None, num_classes: int,
               smoothing: float) -> tuple[dict[str, Any] | None, Callable[..., Any]]:
    """A hypermodel's compile config (``None`` without one) and how labels are fed: class indices
    for a custom model compiled with a sparse loss; else one-hot, smoothed by ``smoothing`` for
    ``cfg``'s own models (``y * (1 - smoothing) + smoothing / classes``, as Keras' loss
    smooths them; in the data, the smoothing is a runtime value of the compiled step)."""
    compiled = classifier.get_compile_config() if classifier is not None else None
    if classifier is not None and not compiled:
        raise ValueError("the hypermodel returned a model that is not compiled: compile it in build(hp), "
                         "as KerasTuner requires")
    if compiled is not None and "sparse" in str(compiled.get("loss")).lower():
        return compiled, lambda y: y
    eye = np.eye(num_classes, dtype=np.float32)
    if compiled is None and smoothing:
        eye = eye * np.float32(1.0 - smoothing) + np.float32(smoothing) / np.float32(num_classes)
    return compiled, lambda y: eye[y]
