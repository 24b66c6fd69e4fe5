"""Where a training step's time goes under JAX: Keras ``fit`` against one compiled loop per epoch.

    KERAS_BACKEND=jax python bench/feed_bench.py --data data/cifar10-jpeg.zip                # the CPU
    KERAS_BACKEND=jax python bench/feed_bench.py --data data/cifar10-jpeg.zip --cnn-images 10000  # a GPU

Two models, each trained for ``--epochs`` epochs at ``--batch``, the near-null model on
``--images`` training images, the seed CNN on ``--cnn-images`` (few by default: on the CPU, its
device loop is slow, see docs/benchmarks.md):

1. the near-null model (a rescale, global average pooling, one dense layer, Adam): its step
   costs almost nothing, so its seconds per step are the feed's, the host's work per step;
2. the seed CNN (the lr_dropout sweep's fixed settings, flip and translate augmentation in the
   model, as every trial trains it).

Each is trained three ways, from the same initial weights: ``fit`` on the full batches a trial
uses (``training.feed.FullBatches``, the epoch's order from ``(seed, epoch)``), the device loop
trials use under JAX on an accelerator (``cifar_exp.training.feed``: the images on the device
once, uint8, each epoch's order drawn the same way, the epoch's steps in one jitted ``lax.scan``
over ``stateless_call`` and ``stateless_apply``, the augmentation in the model), and ``fit`` compiled with
``steps_per_execution`` (``--steps-per-execution``: Keras runs that many steps in one jitted call,
unrolled, the batches still sliced on the host). The first epoch of each
(compilation) is reported apart; the others give the median seconds per step. Ends with

    host_us_per_step fit=... device=... ratio=...

for the near-null model (``ratio``: the device loop's over ``fit``'s), then the CNN's epoch
seconds by feed. Under JAX only (the loop is JAX's ``lax.scan``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras
import numpy as np

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.config.sweepfile import load_sweep
from cifar_exp.training import feed, models
from cifar_exp.training.feed import FullBatches, epoch_order

SEED = 0


def near_null() -> keras.Model:
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def seed_cnn() -> keras.Model:
    sweep = load_sweep("lr_dropout")
    cfg = TrainConfig(**{**sweep.fixed, "learning_rate": 1e-3, "dropout": 0.25, "head_dropout": 0.5})
    return models.build(cfg, 10, seed=SEED)[0]


def compiled(model: keras.Model, steps_per_execution: int = 1) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    return model


def fit_epochs(build: object, x: np.ndarray, y: np.ndarray, batch: int, epochs: int,
               steps_per_execution: int = 1) -> list[float]:
    """Seconds of each epoch of ``fit`` on full batches."""
    keras.utils.set_random_seed(SEED)
    model = compiled(build(), steps_per_execution)  # type: ignore[operator]
    batches = FullBatches(x, np.eye(10, dtype="float32")[y], batch, SEED)
    seconds: list[float] = []
    for epoch in range(epochs):
        batches.start(epoch)
        began = time.perf_counter()
        model.fit(batches, epochs=1, verbose=0, shuffle=False)
        seconds.append(time.perf_counter() - began)
    return seconds


def device_epochs(build: object, x: np.ndarray, y: np.ndarray, batch: int, epochs: int) -> list[float]:
    """Seconds of each epoch of the device loop trials use (``cifar_exp.training.feed``)."""
    import jax.numpy as jnp

    keras.utils.set_random_seed(SEED)
    model = compiled(build())  # type: ignore[operator]
    model.optimizer.build(model.trainable_variables)
    loop = feed.loop_of(model, batch)
    images, labels = feed.resident("train", x), jnp.asarray(np.eye(10, dtype="float32")[y])  # on the device, once
    seconds: list[float] = []
    for e in range(epochs):
        began = time.perf_counter()
        loop.finish(loop.launch(images, labels, epoch_order(SEED, e, len(x))))  # its logs read back, as fit's are
        seconds.append(time.perf_counter() - began)
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a CIFAR-10 source (e.g. data/cifar10-jpeg.zip)")
    p.add_argument("--images", type=int, default=10_000, help="the near-null model's training images (default 10000)")
    p.add_argument("--cnn-images", type=int, default=512, help="the seed CNN's training images (default 512)")
    p.add_argument("--steps-per-execution", type=int, default=8, help="fit's third way (default 8)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per measurement, the first is compilation")
    args = p.parse_args()
    if keras.backend.backend() != "jax":
        print("error: the device loop is JAX's: run with KERAS_BACKEND=jax", file=sys.stderr)
        return 2
    import jax

    dataset = data.load(args.data)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"devices {[d.platform for d in jax.devices()]}; keras {keras.__version__}, jax {jax.__version__}; "
          f"CIFAR-10 (JPEG copy), batch {args.batch}, {args.epochs} epochs each")
    spe = args.steps_per_execution
    feeds = {"fit": fit_epochs, "device": device_epochs,
             f"fit-spe{spe}": lambda *a: fit_epochs(*a, steps_per_execution=spe)}
    per_step, steps = {}, {}
    for name, build, images in (("near-null", near_null, args.images), ("seed CNN", seed_cnn, args.cnn_images)):
        x, y = dataset.x_train[:images], dataset.y_train[:images]
        steps[name] = len(x) // args.batch
        for way, run in feeds.items():
            seconds = run(build, x, y, args.batch, args.epochs)
            steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
            per_step[(name, way)] = steady / steps[name]
            print(f"{name:9s} {way:8s} ({len(x)} images, {steps[name]} steps an epoch): first epoch "
                  f"{seconds[0]:.2f} s (compilation), then {steady:.3f} s an epoch, "
                  f"{steady / steps[name] * 1e6:.0f} us "
                  f"a step", flush=True)
    fit, device = per_step[("near-null", "fit")] * 1e6, per_step[("near-null", "device")] * 1e6
    print(f"host_us_per_step fit={fit:.0f} device={device:.0f} ratio={device / fit:.2f}")
    cnn = {f: per_step[("seed CNN", f)] * steps["seed CNN"] for f in feeds}
    print(f"seed_cnn_epoch_seconds {' '.join(f'{f}={v:.3f}' for f, v in cnn.items())} "
          f"ratio={cnn['device'] / cnn['fit']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
