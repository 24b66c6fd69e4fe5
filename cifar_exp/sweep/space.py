"""Sampling a sweep's search space with Optuna: one ``suggest_*`` call per active dimension, and
the sampler and pruner a sweep names.

The parameter names Optuna records are the sweep keys (and ``TrainConfig`` field names).
Dimensions are visited in the sweep's sampling order (parents before the dimensions that
depend on them); an inactive dimension is not suggested, so Optuna never records it.
"""

from __future__ import annotations

from typing import Any

import optuna

from cifar_exp.config import PrunerConfig, SamplerConfig, Sweep


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


def make_sampler(cfg: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    # Steps are epochs completed (1-based), so min_epochs=1 allows pruning after the first epoch.
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_epochs, max_resource=max(epochs, 1),
                                              reduction_factor=cfg.reduction_factor)
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=cfg.min_epochs)
    return optuna.pruners.NopPruner()
