"""A hypermodel's ``hp.Int/Float/Choice/Boolean/Fixed`` calls, ``conditional_scope`` included, as
Optuna suggestions of the sweep's trial.

``OptunaHyperParameters`` is KerasTuner's own ``HyperParameters`` container with one change: the
first time an active hyperparameter is declared, its value comes from ``trial.suggest_*`` under
the same name instead of its default. KerasTuner's condition bookkeeping decides what is
active, so a hyperparameter in an inactive ``conditional_scope`` is never suggested.
"""

from __future__ import annotations

from typing import Any

import keras_tuner
import optuna

from cifar_exp.training.hypermodel import HypermodelError


def _grid(low: float, high: float, factor: float) -> list[float]:
    values, value = [], low
    while value <= high * (1 + 1e-12):
        values.append(value)
        value *= factor
    return values


class OptunaHyperParameters(keras_tuner.HyperParameters):
    """KerasTuner's ``HyperParameters``, sampled by an Optuna trial (see the module docstring).

    ``values`` holds the sampled values of the active hyperparameters, by KerasTuner name, which
    is also the Optuna and MLflow parameter name."""

    def __init__(self, trial: optuna.Trial) -> None:
        super().__init__()
        self.trial = trial

    def _register(self, hyperparameter: Any, overwrite: bool = False) -> Any:
        if self.is_active(hyperparameter) and hyperparameter.name not in self.values:
            self.values[hyperparameter.name] = suggest(self.trial, hyperparameter)
        return super()._register(hyperparameter, overwrite=False)


def suggest(trial: optuna.Trial, hp: Any) -> Any:
    """One KerasTuner hyperparameter as one Optuna suggestion of the same name and range.

    Log-sampled ``Int``/``Float`` with a step are KerasTuner's geometric grids (``min * step**k``),
    suggested as a categorical over the grid; ``reverse_log`` is sampled as ``log`` (Optuna has
    no reverse-log distribution)."""
    name = hp.name
    kind = type(hp).__name__
    if kind == "Fixed":
        return trial.suggest_categorical(name, [hp.value])
    if kind == "Boolean":
        return trial.suggest_categorical(name, [False, True])
    if kind == "Choice":
        return trial.suggest_categorical(name, list(hp.values))
    log = hp.sampling in ("log", "reverse_log")
    if kind == "Int":
        if log and hp.step and hp.step > 1:
            return int(trial.suggest_categorical(name, [int(v) for v in _grid(hp.min_value, hp.max_value, hp.step)]))
        return trial.suggest_int(name, hp.min_value, hp.max_value, step=1 if log else (hp.step or 1), log=log)
    if kind == "Float":
        if log and hp.step:
            return trial.suggest_categorical(name, _grid(hp.min_value, hp.max_value, hp.step))
        return trial.suggest_float(name, hp.min_value, hp.max_value, step=None if log else hp.step, log=log)
    raise HypermodelError(f"hyperparameter {name}: KerasTuner type {kind} is not supported")
