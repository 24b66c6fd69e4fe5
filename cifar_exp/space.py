"""Sampling a sweep's search space with Optuna: one ``suggest_*`` call per dimension.

The parameter names Optuna records are the sweep keys (and ``TrainConfig`` field names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from cifar_exp.config import Dimension


def suggest(trial: optuna.Trial, space: Mapping[str, Dimension]) -> dict[str, Any]:
    """Sample every dimension of ``space`` on ``trial``; returns parameter name -> value."""
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.type == "int":
            assert dim.low is not None and dim.high is not None
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high),
                                             step=int(dim.step or 1), log=dim.log)
        else:
            assert dim.low is not None and dim.high is not None
            params[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
    return params
