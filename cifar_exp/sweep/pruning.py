"""Per-epoch pruning of a trial, with one objective or several.

One objective: the trial reports each epoch's value to its own study, whose pruner (Hyperband or
median, ``space.make_pruner``) decides. Several: Optuna refuses ``report`` and ``should_prune``
on a multi-objective study, so the trial reports its first objective's learning curve (the one
that evolves per epoch) to a companion study, ``<sweep>.pruning`` in the same storage: single
objective, the first objective's direction, the sweep's pruner. Each trial of the sweep gets
one companion trial (its ``trial_number`` attribute names the sweep's trial), told the same
outcome. The pruner is Optuna's own either way; only where the curve is kept differs.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState

from cifar_exp.config import Settings
from cifar_exp.sweep import space

SUFFIX = ".pruning"


def companion(settings: Settings, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The sweep's companion study of first-objective curves (created on first use)."""
    sweep = settings.sweep
    curves = optuna.create_study(study_name=sweep.name + SUFFIX, storage=storage,
                                 direction=sweep.objective.direction,
                                 sampler=optuna.samplers.RandomSampler(seed=sweep.sampler.seed),
                                 pruner=space.make_pruner(sweep.pruner, sweep.epochs), load_if_exists=True)
    # Labelled for what it is wherever studies are listed (optuna-dashboard, `optuna studies`).
    space.name_objectives(curves, [f"{sweep.objective.metric} (pruning curves of study {sweep.name})"])
    if "companion_of" not in curves.user_attrs:
        curves.set_user_attr("companion_of", sweep.name)
    return curves


class Pruning:
    """The pruning of ``trial`` (of ``study``): ``report`` each epoch (1-based steps),
    ``should_prune``, then ``end`` with the trial's outcome."""

    def __init__(self, settings: Settings, storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> None:
        self.curves: optuna.Study | None = None
        self.reporter = trial
        if len(settings.sweep.objectives) > 1:
            self.curves = companion(settings, storage)
            with warnings.catch_warnings():  # we beat ourselves (``heartbeat``), outside Study.optimize
                warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
                self.reporter = self.curves.ask()
            self.reporter.set_user_attr("trial_number", trial.number)

    def report(self, value: float, step: int) -> None:
        self.reporter.report(value, step)

    def should_prune(self) -> bool:
        return self.reporter.should_prune()

    def end(self, state: TrialState, value: float | None = None) -> None:
        """Tell the companion trial the outcome (the sweep's own study is told by the worker)."""
        if self.curves is not None:
            try:
                self.curves.tell(self.reporter, value if state == TrialState.COMPLETE else None, state=state)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # already ended
