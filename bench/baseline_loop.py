"""The baseline a sweep must beat: a plain sequential Optuna + MLflow loop, written the way the two
libraries' documentation shows it (``study.optimize`` over an objective that opens a nested
MLflow run, trains with ``model.fit``, logs params and per-epoch metrics, and logs the model).

    python bench/baseline_loop.py --data DATA --trials 20 --epochs 5 --store /tmp/baseline

It searches the lr_dropout sweep's space with the same model builder, data split and epochs as
``python -m cifar_exp.sweep lr_dropout``, so only the loop around the training differs. Prints one
JSON line: trials, wall seconds, seconds inside ``fit``.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-images", type=int, help="a class-balanced subset, as the sweep's --train-images")
    parser.add_argument("--store", required=True, help="a folder for the MLflow store")
    args = parser.parse_args()
    started = time.perf_counter()

    import keras
    import mlflow
    import optuna

    from cifar_exp import data
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import models

    sweep = load_sweep("lr_dropout")
    splits = data.split(data.load(args.data), sweep.data.validation_fraction, 0, args.train_images)
    mlflow.set_tracking_uri(f"sqlite:///{args.store}/mlflow.db")
    mlflow.set_experiment("baseline")
    fit_seconds = 0.0

    def objective(trial: optuna.Trial) -> float:
        nonlocal fit_seconds
        params = {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
                  "dropout": trial.suggest_float("dropout", 0.0, 0.6),
                  "head_dropout": trial.suggest_float("head_dropout", 0.0, 0.6)}
        cfg = sweep.train_config({**params, "lr_schedule": "constant"})
        with mlflow.start_run(nested=True, run_name=f"trial-{trial.number}"):
            mlflow.log_params(params)
            keras.utils.set_random_seed(trial.number)
            model, _ = models.build(cfg, len(splits.class_names), seed=trial.number)  # the train model
            model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            t = time.perf_counter()
            history = model.fit(splits.x_train, splits.y_train, batch_size=cfg.batch_size, epochs=args.epochs,
                                validation_data=(splits.x_val, splits.y_val), verbose=0)
            fit_seconds += time.perf_counter() - t
            for epoch in range(args.epochs):
                mlflow.log_metrics({k: v[epoch] for k, v in history.history.items()}, step=epoch)
            mlflow.keras.log_model(model, name="model")
            return float(history.history["val_accuracy"][-1])

    with mlflow.start_run(run_name="baseline-study"):
        optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)).optimize(
            objective, n_trials=args.trials)
    print(json.dumps({"trials": args.trials, "wall_s": time.perf_counter() - started, "fit_s": fit_seconds}))


if __name__ == "__main__":
    main()
