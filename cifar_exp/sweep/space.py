"""Sampling a sweep's search space with Optuna: one ``suggest_*`` call per active dimension, and
the sampler and pruner a sweep names.

The parameter names Optuna records are the sweep keys (and ``TrainConfig`` field names).
Dimensions are visited in the sweep's sampling order (parents before the dimensions that
depend on them); an inactive dimension is not suggested, so Optuna never records it.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from cifar_exp.config import Sweep
from cifar_exp.config.goals import PrunerConfig


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


def make_sampler(sweep: Sweep, seed: int) -> optuna.samplers.BaseSampler:
    """The sweep's sampler, seeded with ``seed``, every option written out: what a bare
    ``TPESampler(seed)`` does on Optuna 5.1 (multivariate with one objective, independent with
    several; constant liar; 10 random startup trials), so that a study samples the same on 5.0,
    whose bare defaults differ, and on 5.1. TPE groups its space by the dimensions trials share
    (``group``) by default where the space has ``when:`` conditions: without it, a conditional
    dimension is sampled independently of the others."""
    cfg = sweep.sampler
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if cfg.name in ("nsga2", "nsga3"):
        size = cfg.population_size or 50
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # NSGA-III
            return (optuna.samplers.NSGAIISampler(seed=seed, population_size=size) if cfg.name == "nsga2"
                    else optuna.samplers.NSGAIIISampler(seed=seed, population_size=size))
    group = cfg.group if cfg.group is not None else (cfg.multivariate is not False
                                                     and any(dim.when for dim in sweep.space.values()))
    multivariate = cfg.multivariate if cfg.multivariate is not None else (len(sweep.objectives) == 1 or group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # group, multivariate
        return optuna.samplers.TPESampler(seed=seed, multivariate=multivariate, group=group,
                                          constant_liar=True if cfg.constant_liar is None else cfg.constant_liar,
                                          n_startup_trials=10 if cfg.n_startup_trials is None else cfg.n_startup_trials)


def make_pruner(cfg: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    # Steps are epochs completed (1-based), so min_epochs=1 allows pruning after the first epoch.
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_epochs, max_resource=max(epochs, 1),
                                              reduction_factor=cfg.reduction_factor)
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=cfg.min_epochs)
    return optuna.pruners.NopPruner()


def name_objectives(study: optuna.Study, names: list[str]) -> None:
    """Give ``study``'s objectives their metrics' names (``val_accuracy``, ``latency_ms``), which
    the Optuna dashboard, its CLI and plots show instead of "Objective 0"; a study from before
    gets them on its next start."""
    if study.metric_names != names:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
