"""How a trial's batches reach the model: ``fit`` (Keras' loop, a step at a time from the host)
or, under JAX, the device loop: the training images on the device once per worker (uint8), each
epoch's order drawn from ``(seed, epoch)`` as ``FullBatches`` draws it (``epoch_order``), the
augmentation in the model (on the device), and the epoch's steps in one jitted ``lax.scan`` over
``stateless_call`` and the optimizer's ``stateless_apply``; validation in jitted chunks. The
epoch's hooks are Keras callbacks as in ``fit`` (logging, pruning, the plateau rule, the best
epoch, checkpoints): after each epoch the loop's state is written back into the model's and the
optimizer's variables, where they read it. A per-step schedule stays per step (it is the
optimizer's, inside the scanned step). Imports neither optuna nor mlflow.

Decision: the device loop is the default only on an accelerator (``choose``). On the 2-core CPU
machine (JAX 0.10.2) it took 221 us a step of the near-null model against 897 us in ``fit``, but
66.2 s an epoch of the seed CNN against 1.196 s: XLA's CPU backend runs convolutions inside a
loop 55x slower (``bench/feed_bench.py``, docs/benchmarks.md). So on the CPU trials keep ``fit``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Literal

import keras
import numpy as np

from cifar_exp.config import TrainConfig

Feed = Literal["fit", "device"]


def epoch_order(seed: int, epoch: int, images: int) -> np.ndarray:
    """The order of the training images in ``epoch``: a permutation drawn from ``(seed, epoch)``
    alone, so a run resumed at any epoch sees the batches the uninterrupted run saw."""
    return np.random.default_rng((seed, epoch)).permutation(images)


class FullBatches(keras.utils.PyDataset):
    """The training images in full batches only: each epoch a permutation drawn from ``(seed,
    epoch)`` (``start(epoch)`` before the epoch's first batch), cut into ``len(x) // batch_size``
    batches; the remainder of the permutation (under one batch, different images each epoch) is
    left out of that epoch. Data of fewer images than one batch is one batch of all of them.

    Decision: every step has the same shape, so the train step compiles once. Keras' array input
    ends each epoch with a partial batch, a second shape and, under JAX, a second compilation of
    the whole train step in every trial: one epoch of 1,800 images at batch 256 of the lr_dropout
    CNN made 2 XLA compilations (21.36 s compiling, JAX on the 2-core CPU machine), these batches
    1 (7.93 s). Used under JAX only: TensorFlow's trainer relaxes shapes itself, and this class
    made its epochs slower there (3 epochs of 1,800 images: 18.2, 12.7, 21.9 s against 13.9, 9.1,
    9.0 s with arrays, same machine).
    Decision: the order is a function of the epoch alone, and ``fit`` must not shuffle the batches
    (``shuffle=False``): Keras shuffles them with NumPy's global generator, and it calls
    ``on_epoch_end`` once more for a model it builds in ``fit`` than for one already built; either
    made a trial on a reused program (``programs``) see other batches than on a fresh build."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x))
        self.seed = seed
        self.start(0)

    def start(self, epoch: int) -> None:
        self.order = epoch_order(self.seed, epoch, len(self.x))

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[batch], self.y[batch]


def choose(requested: Literal["auto", "fit", "device"], cfg: TrainConfig, custom: bool) -> Feed:
    """The feed of a trial: ``requested``, or for ``auto`` the device loop under JAX on an
    accelerator for this project's own CNN and airbench families, ``fit`` otherwise (the
    TensorFlow backend, a hypermodel, transfer learning, the CPU). ``ValueError`` for a device
    loop that cannot apply."""
    applies = keras.backend.backend() == "jax" and not custom and cfg.model != "transfer"
    if requested == "device" and not applies:
        raise ValueError("the device loop trains this project's CNN and airbench models under KERAS_BACKEND=jax "
                         "only: use the fit feed")
    if requested != "auto":
        return requested
    if not applies:
        return "fit"
    import jax

    return "device" if jax.default_backend() != "cpu" else "fit"


_LOOPS: weakref.WeakKeyDictionary[keras.Model, DeviceLoop] = weakref.WeakKeyDictionary()
_RESIDENT: dict[str, tuple[np.ndarray, Any]] = {}  # which images -> (the host array, its device copy)


def resident(name: str, images: np.ndarray) -> Any:
    """``images`` on the device, copied once while the same host array is given (a worker's)."""
    import jax.numpy as jnp

    kept = _RESIDENT.get(name)
    if kept is None or kept[0] is not images:
        kept = (images, jnp.asarray(images))
        _RESIDENT[name] = kept
    return kept[1]


def loop_of(model: keras.Model, batch_size: int) -> DeviceLoop:
    """The compiled loop of the compiled train ``model`` (kept with it: a reused program's model
    brings its loop, and a seen structure compiles nothing)."""
    loop = _LOOPS.get(model)
    if loop is None or loop.batch_size != batch_size:
        loop = _LOOPS[model] = DeviceLoop(model, batch_size)
    return loop


class DeviceLoop:
    """A train model's epoch and validation programs (jitted once, traced per shape)."""

    def __init__(self, model: keras.Model, batch_size: int) -> None:
        import jax

        self.model, self.batch_size = model, batch_size
        self._epoch = jax.jit(self._epoch_fn)
        self._score = jax.jit(self._score_fn)

    def _loss(self, labels: Any, probabilities: Any) -> Any:
        return keras.losses.CategoricalCrossentropy()(labels, probabilities)

    def _epoch_fn(self, state: Any, images: Any, labels: Any, batches: Any) -> Any:
        import jax
        import jax.numpy as jnp

        model, optimizer = self.model, self.model.optimizer

        def step(carry: Any, index: Any) -> Any:
            trainable, non_trainable, opt = carry
            x, y = images[index], labels[index]

            def loss(weights: Any) -> Any:
                probabilities, updated = model.stateless_call(weights, non_trainable, x, training=True)
                return self._loss(y, probabilities), (probabilities, updated)

            (value, (probabilities, non_trainable)), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
            trainable, opt = optimizer.stateless_apply(opt, grads, trainable)
            hits = jnp.sum(jnp.argmax(probabilities, -1) == jnp.argmax(y, -1))
            return (trainable, non_trainable, opt), (value, hits)

        return jax.lax.scan(step, state, batches)

    def _score_fn(self, trainable: Any, non_trainable: Any, x: Any, y: Any) -> Any:
        import jax.numpy as jnp

        probabilities, _ = self.model.stateless_call(trainable, non_trainable, x, training=False)
        per_image = keras.losses.categorical_crossentropy(y, probabilities)
        return jnp.sum(per_image), jnp.sum(jnp.argmax(probabilities, -1) == jnp.argmax(y, -1))

    def _state(self) -> tuple[list[Any], list[Any], list[Any]]:
        model = self.model
        return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                [v.value for v in model.optimizer.variables])

    def _store(self, state: tuple[list[Any], list[Any], list[Any]]) -> None:
        model = self.model
        for variables, values in zip((model.trainable_variables, model.non_trainable_variables,
                                      model.optimizer.variables), state, strict=True):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)

    def launch(self, images: Any, labels: Any, order: np.ndarray) -> Any:
        """Start one epoch on the batches ``order`` cuts (full batches, in order); JAX runs it
        while the host goes on. ``finish`` waits for it."""
        import jax.numpy as jnp

        steps = len(order) // self.batch_size
        batches = jnp.asarray(order[:steps * self.batch_size].reshape(steps, self.batch_size))
        return self._epoch(self._state(), images, labels, batches), steps * self.batch_size

    def finish(self, launched: Any) -> dict[str, float]:
        """The variables set to the epoch's end state; its ``loss`` (the mean of its steps'
        losses) and ``accuracy``."""
        import jax.numpy as jnp

        (state, (losses, hits)), images = launched
        self._store(state)
        return {"loss": float(jnp.mean(losses)), "accuracy": float(jnp.sum(hits)) / images}

    def score(self, images: Any, labels: Any) -> dict[str, float]:
        """``val_loss`` and ``val_accuracy`` over every image, in batches of ``batch_size``."""
        trainable, non_trainable, _ = self._state()
        step = self.batch_size
        chunks = [self._score(trainable, non_trainable, images[start:start + step], labels[start:start + step])
                  for start in range(0, len(images), step)]
        # read back once per pass: a float() per chunk would wait for the device after every chunk
        total, hits = (float(sum(values)) for values in zip(*chunks, strict=True))
        return {"val_loss": total / len(images), "val_accuracy": hits / len(images)}


def fit(model: keras.Model, x: np.ndarray, y: np.ndarray, validation: tuple[np.ndarray, np.ndarray],
        batch_size: int, seed: int, epochs: range, callbacks: Sequence[keras.callbacks.Callback],
        history: dict[str, list[float]]) -> None:
    """Train the compiled ``model`` for ``epochs`` with the device loop: what ``fit`` would do,
    the callbacks heard at each epoch's begin and end (``on_train_batch_begin(1)`` once the epoch
    is launched), each epoch's logs appended to ``history``. ``y`` and the validation labels are
    the labels as fed (one-hot, smoothed); each epoch in the order ``epoch_order(seed, epoch, n)``."""
    import jax.numpy as jnp

    if not model.optimizer.built:  # as fit builds it, at the first step
        model.optimizer.build(model.trainable_variables)
    loop = loop_of(model, min(batch_size, len(x)))
    images, labels = resident("train", x), jnp.asarray(y)
    val_images, val_labels = resident("validation", validation[0]), jnp.asarray(validation[1])

    def record(epoch: int, logs: dict[str, Any]) -> None:  # last: the logs as the hooks completed them
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))

    hooks = keras.callbacks.CallbackList([*callbacks, keras.callbacks.LambdaCallback(on_epoch_end=record)],
                                         model=model)
    hooks.on_train_begin()
    for epoch in epochs:
        hooks.on_epoch_begin(epoch)
        launched = loop.launch(images, labels, epoch_order(seed, epoch, len(x)))
        hooks.on_train_batch_begin(1)  # compiled and launched: the first step is on its way
        logs = loop.finish(launched)
        logs.update(loop.score(val_images, val_labels))
        hooks.on_epoch_end(epoch, logs)
    hooks.on_train_end()
