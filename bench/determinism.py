"""What deterministic kernels cost: epoch time of the lr_dropout CNN with ``deterministic`` on and off.

    python bench/determinism.py --data data/cifar10-jpeg.zip --train-images 5000 --epochs 3

Each mode runs in its own fresh process (TensorFlow's op determinism cannot be switched off once
on), with the environment the CLI sets. Reports the median epoch time after the first epoch
(which includes compilation), the first epoch's time, and the final val_accuracy of each mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    from cifar_exp.cli.environment import set_environment

    set_environment(args.mode == "on")
    from cifar_exp import data
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import backend, train

    backend.use_deterministic_ops(args.mode == "on")
    sweep = load_sweep("lr_dropout")
    cfg = sweep.train_config({"learning_rate": 1e-3, "dropout": 0.25, "head_dropout": 0.5, "lr_schedule": "cosine"})
    splits = data.split(data.load(args.data), sweep.data.validation_fraction, 0)
    splits = data.Splits(splits.x_train[: args.train_images], splits.y_train[: args.train_images],
                         splits.x_val, splits.y_val, splits.x_test[:1000], splits.y_test[:1000], splits.class_names)
    result = train.train(cfg, splits, epochs=args.epochs, seed=0)
    seconds = result.history["epoch_seconds"]
    return {"mode": args.mode, "first_epoch_s": seconds[0], "median_epoch_s": statistics.median(seconds[1:]),
            "val_accuracy": result.history["val_accuracy"][-1], "identity": backend.identity(),
            "train_images": len(splits.x_train), "val_images": len(splits.x_val), "epochs": args.epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 source, as for --data of the sweep")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mode", choices=("on", "off"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    results = []
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--data", args.data,
                              "--train-images", str(args.train_images), "--epochs", str(args.epochs)],
                             capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    identity = results[0]["identity"]
    print(f"{identity['keras_backend']} {identity['backend_version']}, keras {identity['keras_version']}, "
          f"{identity['device']}; {results[0]['train_images']} train / {results[0]['val_images']} val images, "
          f"{args.epochs} epochs")
    for r in results:
        print(f"deterministic {r['mode']:>3}: median epoch {r['median_epoch_s']:.2f} s "
              f"(first {r['first_epoch_s']:.2f} s), val_accuracy {r['val_accuracy']:.4f}")
    off, on = results
    print(f"cost of deterministic kernels: {on['median_epoch_s'] / off['median_epoch_s']:.3f}x epoch time")


if __name__ == "__main__":
    main()
