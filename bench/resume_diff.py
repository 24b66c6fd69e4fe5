"""A trial resumed from its checkpoint against the same trial uninterrupted, on real images.

    python bench/resume_diff.py --data data/cifar10-jpeg.zip --train-images 2000 --epochs 3 --dies-at 1

Trains the lr_dropout CNN (cosine schedule) for ``--epochs``; then again, with the run stopped by
an exception raised in the hook of epoch ``--dies-at`` (as a killed worker stops, before that
epoch's checkpoint), and a third time from that checkpoint. Prints, per epoch and metric, the
uninterrupted and the resumed values and their difference, and whether the test
probabilities are equal bit for bit. Run once per backend (``KERAS_BACKEND``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


class Died(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 source, as for --data of the sweep")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dies-at", type=int, default=1)
    args = parser.parse_args()
    from cifar_exp.cli.environment import set_environment

    set_environment(True)
    import keras
    import numpy as np

    from cifar_exp import data
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import backend, checkpoints, train

    backend.use_deterministic_ops(True)
    sweep = load_sweep("lr_dropout")
    cfg = sweep.train_config({"learning_rate": 1e-3, "dropout": 0.25, "head_dropout": 0.5, "lr_schedule": "cosine"})
    splits = data.split(data.load(args.data), sweep.data.validation_fraction, 0, args.train_images)

    def die(epoch: int, logs: object) -> None:
        if epoch == args.dies_at:
            raise Died()

    with tempfile.TemporaryDirectory() as tmp:
        whole = train.train(cfg, splits, epochs=args.epochs, seed=11)
        keras.backend.clear_session()
        try:
            train.train(cfg, splits, epochs=args.epochs, seed=11, callbacks=[train.Observer(on_epoch_end=die)],
                        options=train.TrainOptions(checkpoint=checkpoints.Slot(Path(tmp) / "c.npz")))
        except Died:
            pass
        keras.backend.clear_session()
        resumed = train.train(cfg, splits, epochs=args.epochs, seed=11,
                              options=train.TrainOptions(checkpoint=checkpoints.Slot(Path(tmp) / "c.npz")))
    identity = backend.identity()
    print(f"{identity['keras_backend']} {identity['backend_version']}, keras {identity['keras_version']}, "
          f"{identity['device']}; {len(splits.x_train)} train / {len(splits.x_val)} val / {len(splits.x_test)} "
          f"test images of the CIFAR-10 (JPEG copy); killed in epoch {args.dies_at}, resumed from its checkpoint")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        for epoch, (a, b) in enumerate(zip(whole.history[key], resumed.history[key], strict=True)):
            print(f"  epoch {epoch} {key:>13}: uninterrupted {a:.10g}  resumed {b:.10g}  difference {b - a:+.3g}")
    print(f"  test_accuracy: uninterrupted {whole.test_accuracy:.4f}, resumed {resumed.test_accuracy:.4f}; "
          f"test probabilities equal bit for bit: {bool(np.array_equal(whole.y_prob, resumed.y_prob))}")


if __name__ == "__main__":
    main()
