"""Does a short run mean something? Validation and test accuracy of the lr_dropout CNN after a few
epochs on a training subset, for BatchNorm momentum values and learning rates.

    python bench/short_runs.py --data data/cifar10-jpeg.zip --train-images 5000 --epochs 3

What decided the CNN family's ``bn_momentum`` and ``head`` defaults (README, "Short runs"): each
(``head``, ``bn_momentum``, ``learning_rate``) trains the lr_dropout sweep's CNN (constant schedule, dropout
0.25, head dropout 0.5, seed 0) on the same class-balanced subset, validated on the sweep's
whole validation split (5,000 images) and tested on all 10,000 test images.
"""

from __future__ import annotations

import argparse
import os

from cifar_exp.cli.environment import set_environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 source, as for --data of the sweep")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bn-momentum", default="0.99,0.9", help="comma-separated values")
    parser.add_argument("--learning-rate", default="1e-4,1e-3,1e-2", help="comma-separated values")
    parser.add_argument("--head", default="flatten,global_avg", help="comma-separated values")
    args = parser.parse_args()
    set_environment(deterministic=True)
    from cifar_exp import data, metrics
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import backend, train

    backend.use_deterministic_ops(True)
    sweep = load_sweep("lr_dropout")
    splits = data.split(data.load(args.data), sweep.data.validation_fraction, 0, args.train_images)
    identity = backend.identity()
    print(f"{identity['keras_backend']} {identity['backend_version']}, keras {identity['keras_version']}, "
          f"{identity['device']}, {os.cpu_count()} CPUs; {len(splits.y_train)} train / {len(splits.y_val)} val / "
          f"{len(splits.y_test)} test images, {args.epochs} epochs, batch {sweep.fixed['batch_size']}")
    print("| head | bn_momentum | learning_rate | accuracy per epoch | val_accuracy per epoch | test_accuracy | "
          "degenerate |")
    print("|---|---|---|---|---|---|---|")
    for head, momentum, rate in ((h, float(m), float(r)) for h in args.head.split(",")
                                 for m in args.bn_momentum.split(",") for r in args.learning_rate.split(",")):
        cfg = sweep.train_config({"learning_rate": rate, "dropout": 0.25, "head_dropout": 0.5, "head": head,
                                  "lr_schedule": "constant", "bn_momentum": momentum})
        result = train.train(cfg, splits, epochs=args.epochs, seed=0)
        verdict = metrics.degenerate(result.history, result.y_prob, len(splits.y_val), splits.class_names)
        curves = [", ".join(f"{v:.4f}" for v in result.history[key]) for key in ("accuracy", "val_accuracy")]
        print(f"| {head} | {momentum} | {rate:g} | {curves[0]} | {curves[1]} | {result.test_accuracy:.4f} | "
              f"{verdict or 'no'} |", flush=True)


if __name__ == "__main__":
    main()
