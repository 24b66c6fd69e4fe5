"""Bounded storage: the logged models of all but a study's best trials deleted through MLflow
(``cifar-exp gc NAME --keep K``, and ``keep_models: K`` when a sweep ends).

Kept: the models of the ``keep`` best feasible complete trials that still have one (the ranking
every command shows, ``config.outcomes.ranked``), every model a Model Registry version holds
(by run or by logged model), and every trial not finished (a running trial's model is not
logged yet, and never deleted). Deleted: the others' models, files and logged-model entity, of
complete, pruned and failed trials alike. A trial's run, metrics and other artifacts stay; the
trial numbers collected are the study's ``models_collected`` (``config.records``), which the
report, ``compare`` and ``register`` read.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cifar_exp.config import outcomes
from cifar_exp.config.goals import Objective
from cifar_exp.config.records import TrialAttrs
from cifar_exp.track import models

FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class Plan:
    """What a collection keeps and deletes: trial numbers, best first where ranked."""

    kept: list[int]  # the best trials' models
    registered: list[int]  # models kept because a registry version holds them
    delete: list[tuple[int, str]]  # (trial number, model URI)


@dataclass(frozen=True)
class Collected:
    plan: Plan
    deleted: list[int]
    freed: int  # bytes of the files deleted


def plan(trials: Sequence[outcomes.Judged], objectives: Sequence[Objective], keep: int,
         collected: Collection[int], registered_runs: Collection[str], registered_models: Collection[str]) -> Plan:
    """Which models a collection keeping ``keep`` keeps and deletes (pure): ``collected`` are the
    trials whose models are gone already; ``registered_*`` what the registry holds."""
    alive = [t for t in trials if t.state.name in FINISHED and TrialAttrs.of(t).model_uri
             and t.number not in collected]
    kept = [t.number for t in outcomes.ranked([t for t in alive if t.state.name == "COMPLETE"], objectives)[:keep]]
    registered, delete = [], []
    for t in sorted(alive, key=lambda t: t.number):
        attrs = TrialAttrs.of(t)
        uri = str(attrs.model_uri)
        if t.number in kept:
            continue
        if attrs.mlflow_run_id in registered_runs or models.logged_model_id(uri) in registered_models:
            registered.append(t.number)
        else:
            delete.append((t.number, uri))
    return Plan(kept, registered, delete)


def collect(trials: Sequence[outcomes.Judged], objectives: Sequence[Objective], keep: int,
            collected: Collection[int]) -> Collected:
    """Delete the models ``plan`` deletes (the registry asked now); returns what was freed."""
    runs, registered_models = models.protected_runs()
    chosen = plan(trials, objectives, keep, collected, runs, registered_models)
    freed, deleted = 0, []
    for number, uri in chosen.delete:
        freed += models.delete_model(uri)
        deleted.append(number)
    return Collected(chosen, deleted, freed)
