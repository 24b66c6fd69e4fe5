"""KerasTuner hypermodels as the model of a sweep: ``hp.Int/Float/Choice/Boolean/Fixed`` calls,
``conditional_scope`` included, become Optuna suggestions of the sweep's trial.

A sweep names its hypermodel as ``hypermodel: module:attribute`` (a ``build(hp)`` function, or a
``keras_tuner.HyperModel`` subclass or instance), written for KerasTuner and run unchanged.
``OptunaHyperParameters`` is KerasTuner's own ``HyperParameters`` container with one change: the
first time an active hyperparameter is declared, its value comes from ``trial.suggest_*`` under
the same name instead of its default. KerasTuner's condition bookkeeping decides what is
active, so a hyperparameter in an inactive ``conditional_scope`` is never suggested.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import keras_tuner
import optuna

from cifar_exp.config import UserError
from cifar_exp.train import CustomModel


class HypermodelError(UserError):
    """The sweep's hypermodel cannot be imported or does not build a usable model."""


def load(spec: str) -> keras_tuner.HyperModel:
    """The hypermodel named ``module:attribute`` (importable from the working directory)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is the user's to fix
        raise HypermodelError(f"hypermodel {spec}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
                              f"run from the folder that holds it, or install it") from None
    target = getattr(module, attribute, None)
    if target is None:
        raise HypermodelError(f"hypermodel {spec}: {module_name} has no attribute '{attribute}'")
    if isinstance(target, type) and issubclass(target, keras_tuner.HyperModel):
        target = target()
    if isinstance(target, keras_tuner.HyperModel):
        return target
    if inspect.isfunction(target) and _takes_one_argument(target):
        return _Function(target)
    raise HypermodelError(f"hypermodel {spec}: {attribute} is neither a build(hp) function nor a "
                          f"keras_tuner.HyperModel")


def _takes_one_argument(function: Callable[..., Any]) -> bool:
    """Whether ``function`` can be called as ``build(hp)``."""
    try:
        inspect.signature(function).bind(None)
    except TypeError:
        return False
    return True


class _Function(keras_tuner.HyperModel):
    """A plain ``build(hp)`` function as a HyperModel (what KerasTuner's tuners do with one)."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        super().__init__()
        self._build = build

    def build(self, hp: Any) -> Any:
        return self._build(hp)


def overrides_fit(hypermodel: keras_tuner.HyperModel) -> bool:
    """Whether the hypermodel tunes training itself (KerasTuner's ``HyperModel.fit`` override)."""
    return type(hypermodel).fit is not keras_tuner.HyperModel.fit


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


def fixed(values: Mapping[str, Any]) -> keras_tuner.HyperParameters:
    """KerasTuner ``HyperParameters`` that build with the given ``values`` (a logged trial's):
    what a rerun builds from."""
    hp = keras_tuner.HyperParameters()
    hp.values.update(values)
    return hp



def custom_model(hypermodel: keras_tuner.HyperModel, hp: keras_tuner.HyperParameters) -> CustomModel:
    """The hypermodel as ``train``'s custom model: built with ``hp``, trained through its own
    ``fit`` when it overrides KerasTuner's (which then also chooses the batch size)."""
    fit = None
    if overrides_fit(hypermodel):
        def fit(model: Any, *args: Any, **kwargs: Any) -> Any:
            return hypermodel.fit(hp, model, *args, **kwargs)
    return CustomModel(build=lambda: hypermodel.build(hp), fit=fit)
