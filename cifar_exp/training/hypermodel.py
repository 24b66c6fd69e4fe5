"""KerasTuner hypermodels as the model of a sweep: loading one, and building and training it with
given ``HyperParameters`` (a trial's, sampled by either engine, or a logged trial's for a rerun).

A sweep names its hypermodel as ``hypermodel: module:attribute`` (a ``build(hp)`` function, or a
``keras_tuner.HyperModel`` subclass or instance), written for KerasTuner and run unchanged.
Optuna's side (a trial's suggestions as KerasTuner's ``HyperParameters``) is
``cifar_exp.sweep.hyperparameters``: training imports no Optuna.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import keras_tuner

from cifar_exp.config import UserError
from cifar_exp.training.train import CustomModel


class HypermodelError(UserError):
    """The sweep's hypermodel cannot be imported or does not build a usable model."""


def load(spec: str) -> keras_tuner.HyperModel:
    """The hypermodel named ``module:attribute`` (importable from the working directory)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 (any import-time failure of user code is the user's to fix)
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
