"""Sampling a sweep's search space with Optuna: one ``suggest_*`` call per active dimension.

The parameter names Optuna records are the sweep keys (and ``TrainConfig`` field names).
Dimensions are visited in the sweep's sampling order (parents before the dimensions that
depend on them); an inactive dimension is not suggested, so Optuna never records it.
"""

from __future__ import annotations

from typing import Any

import optuna

from cifar_exp.config import Sweep


def suggest(trial: optuna.Trial, sweep: Sweep) -> dict[str, Any]:
    """Sample every active dimension of ``sweep.space`` on ``trial``; returns name -> value."""
    params: dict[str, Any] = {}
    for name, dim in sweep.space.items():
        if not sweep.active(name, params):
            continue
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
