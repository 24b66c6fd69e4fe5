"""What per-epoch checkpoints cost a trial, and what one ``fit`` per epoch costs TensorFlow.

    python bench/checkpoint_bench.py --data data/cifar10-jpeg.zip --train-images 5000 --epochs 4

Runs in a fresh process per backend (TensorFlow, then JAX), with the environment the CLI sets,
the lr_dropout CNN. Reports per backend: the median training seconds per epoch (``fit_seconds``
over epochs, compilation excluded) without and with a checkpoint, the seconds of one
checkpoint write and its size; under TensorFlow also the median epoch of Keras' own shuffled
arrays in one ``fit`` call (what training did before) against one ``fit`` per epoch on arrays
in the epoch's order (what resuming needs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    from cifar_exp.cli.environment import set_environment

    set_environment(True)
    import keras

    from cifar_exp import data
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import backend, checkpoints, feed, models, train

    backend.use_deterministic_ops(True)
    sweep = load_sweep("lr_dropout")
    cfg = sweep.train_config({"learning_rate": 1e-3, "dropout": 0.25, "head_dropout": 0.5, "lr_schedule": "cosine"})
    splits = data.split(data.load(args.data), sweep.data.validation_fraction, 0)
    splits = data.Splits(splits.x_train[: args.train_images], splits.y_train[: args.train_images],
                         splits.x_val, splits.y_val, splits.x_test[:1000], splits.y_test[:1000], splits.class_names)
    row: dict = {"backend": keras.backend.backend(), "identity": backend.identity(),
                 "train_images": len(splits.x_train), "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("without", None), ("with", Path(tmp) / "c.npz")):
            epochs: list[float] = []
            started = [time.perf_counter()]

            def lap(epoch: int, logs: object, epochs: list[float] = epochs, started: list[float] = started) -> None:
                epochs.append(time.perf_counter() - started[0])  # the epoch with its checkpoint write
                started[0] = time.perf_counter()

            slot = checkpoints.Slot(path) if path else None
            train.train(cfg, splits, epochs=args.epochs, seed=0, callbacks=[train.Observer(on_epoch_end=lap)],
                        options=train.TrainOptions(checkpoint=slot))
            keras.backend.clear_session()
            # each lap ends at the next epoch's hooks: it holds the previous epoch's checkpoint write
            row[f"{name}_checkpoint_epoch_s"] = statistics.median(epochs[1:])
        state = checkpoints.load(checkpoints.Slot(Path(tmp) / "c.npz"), checkpoints.fingerprint(
            cfg, 0, args.epochs, (splits.x_train.shape, splits.x_val.shape), 10))
        assert state is not None
        t = time.perf_counter()
        for _ in range(5):
            checkpoints.save(Path(tmp) / "w.npz", "bench", state)
        row["write_s"] = (time.perf_counter() - t) / 5
        row["checkpoint_mib"] = os.path.getsize(Path(tmp) / "w.npz") / 2**20
    if keras.backend.backend() == "tensorflow":
        import numpy as np

        onehot = np.eye(10, dtype="float32")
        spans_by: dict[str, list[float]] = {"once": [], "per_epoch": []}
        for name in ("once", "per_epoch") * args.rounds:  # alternated: the machine's drift hits both
            keras.utils.set_random_seed(0)
            train_model, _ = models.build(cfg, 10, seed=0)
            train_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                                metrics=["accuracy"])
            seen: list[float] = []
            timer = keras.callbacks.LambdaCallback(
                on_epoch_begin=lambda e, logs, seen=seen: seen.append(time.perf_counter()),
                on_epoch_end=lambda e, logs, seen=seen: seen.append(time.perf_counter()))
            x, y, val = splits.x_train, onehot[splits.y_train], (splits.x_val, onehot[splits.y_val])
            if name == "once":
                train_model.fit(x, y, batch_size=cfg.batch_size, epochs=args.epochs, shuffle=True, verbose=0,
                                validation_data=val, callbacks=[timer])
                spans = [seen[i + 1] - seen[i] for i in range(0, len(seen), 2)]
            else:
                spans = []
                for epoch in range(args.epochs):
                    t = time.perf_counter()  # the whole call: the arrays reordered and the fit's set-up too
                    order = feed.epoch_order(0, epoch, len(x))
                    train_model.fit(x[order], y[order], batch_size=cfg.batch_size, initial_epoch=epoch,
                                    epochs=epoch + 1, shuffle=False, verbose=0, validation_data=val)
                    spans.append(time.perf_counter() - t)
            spans_by[name] += spans[1:]
            keras.backend.clear_session()
        for name, spans in spans_by.items():
            row[f"tf_fit_{name}_epoch_s"] = statistics.median(spans)
            row[f"tf_fit_{name}_all_s"] = [round(x, 2) for x in spans]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 source, as for --data of the sweep")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of the two TensorFlow fit modes")
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    root = Path(__file__).resolve().parent.parent
    for name in args.backends.split(","):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--data", args.data,
                              "--train-images", str(args.train_images), "--epochs", str(args.epochs),
                              "--rounds", str(args.rounds)],
                             capture_output=True, text=True, check=True, cwd=root,
                             env={**os.environ, "KERAS_BACKEND": name, "PYTHONPATH": str(root)}).stdout
        r = json.loads(out.strip().splitlines()[-1])
        identity = r["identity"]
        print(f"{identity['keras_backend']} {identity['backend_version']}, keras {identity['keras_version']}, "
              f"{identity['device']}, {os.cpu_count()} CPUs; {r['train_images']} train images, {args.epochs} epochs")
        print(f"  median epoch: {r['without_checkpoint_epoch_s']:.2f} s without a checkpoint, "
              f"{r['with_checkpoint_epoch_s']:.2f} s with one; a write {r['write_s']:.3f} s, "
              f"{r['checkpoint_mib']:.1f} MiB")
        if "tf_fit_once_epoch_s" in r:
            print(f"  TensorFlow epoch, Keras' shuffle in one fit: {r['tf_fit_once_epoch_s']:.2f} s; "
                  f"one fit per epoch in our order: {r['tf_fit_per_epoch_epoch_s']:.2f} s (medians of "
                  f"{r['tf_fit_once_all_s']} and {r['tf_fit_per_epoch_all_s']})")


if __name__ == "__main__":
    main()
