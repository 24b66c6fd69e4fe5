"""Training from plain values: ``train`` builds, compiles and fits a model from a ``TrainConfig``
and returns a ``TrainResult``; models, layers, optimizers, compiled-program reuse, checkpoints,
backend set-up and KerasTuner hypermodels beside it. Imports neither Optuna nor MLflow."""
