"""What the registry does with a study's models, as the register and gc commands (and the sweep's
``--register`` and ``keep_models``) ask: register its best trial's model and promote it
(``register_best``), delete all but its best trials' models (``collect_models``). Each decides
and returns what it did; the lines a waiting or training call shows while it works go to ``say``.
The caller has set up the process (environment, tracking store) before."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cifar_exp import track
from cifar_exp.config import Sweep, UserError, outcomes
from cifar_exp.config.records import StudyAttrs, TrialAttrs


def _silent(line: str) -> None:
    """The default ``say``: nothing shown."""


@dataclass(frozen=True)
class Registered:
    """What ``register_best`` did: the version registered (or found registered) for ``trial``
    (its number), whether it became the champion and why; with confirmation seeds, the
    candidates and their confirmations (``confirm.Confirmed``)."""

    version: track.models.Version
    trial: int
    promoted: bool
    reason: str
    confirmed: Any = None  # confirm.Confirmed with --seeds, else None


def register_best(chosen: Sweep, storage_url: str, data_source: str | None, rule: outcomes.Rule | None = None,
                  seeds: int = 0, say: Callable[[str], None] = _silent) -> Registered:
    """Register the study's best model (by ``rule``, default the first objective's best on the
    front; a degenerate trial never) as challenger and promote it to champion if it beats the
    champion: on the test set of ``data_source`` (default: the data the trial trained on), or
    with ``seeds`` over that many confirmation seeds per candidate (``confirm``). First ends the
    confirmation runs a killed register left RUNNING; holds the study's models lock (shared)
    from choosing to registering, so gc deletes no model meanwhile. ``UserError`` when nothing
    can be registered."""
    from cifar_exp.sweep import storage, supervisor

    study = storage.load_existing(storage_url, chosen.name)
    closed = supervisor.close_confirmations(storage_url, study, chosen.name)
    if closed:
        say(f"closed {len(closed)} confirmation run(s) a killed register left RUNNING (now KILLED)")
    with storage.models_lock(storage_url, study, chosen.name, shared=True,
                             on_wait=lambda: say(f"waiting for gc {chosen.name} to finish")):
        trials = [t for t in study.get_trials(deepcopy=False) if t.number not in StudyAttrs.of(study).models_collected]
        if seeds:
            return _confirmed(chosen, study, trials, rule, seeds, say)
        return _one_seed(chosen, trials, data_source, rule)


def _one_seed(chosen: Sweep, trials: list[Any], data_source: str | None, rule: outcomes.Rule | None) -> Registered:
    from cifar_exp import data, registry

    best = registry.best_trial(trials, chosen, rule)
    if data_source is None:  # the data the trial trained on, which --data may have overridden
        data_source = track.get_run(str(TrialAttrs.of(best).mlflow_run_id)).tags.get("data_source", chosen.data.source)
    promotion = registry.promote(chosen, chosen.model_name, trials, data.load(data_source), rule)
    return Registered(promotion.version, promotion.trial.number, promotion.promoted, promotion.reason)


def _confirmed(chosen: Sweep, study: Any, trials: list[Any], rule: outcomes.Rule | None, seeds: int,
               say: Callable[[str], None]) -> Registered:
    from cifar_exp.registry import confirm
    from cifar_exp.training import backend

    attrs = StudyAttrs.of(study)
    parent, experiment = attrs.mlflow_parent_run_id, attrs.mlflow_experiment_id
    if not parent or not experiment:
        raise UserError(f"study '{chosen.name}' has no MLflow parent run yet: run the sweep first")
    trainer = confirm.Trainer(str(experiment), str(parent), backend.identity(), on_run=say)
    done = confirm.promote(chosen, chosen.model_name, trials, seeds, rule, trainer)
    return Registered(done.version, done.trial.number, done.promoted, done.reason, done)


@dataclass(frozen=True)
class Collected:
    """What ``collect_models`` did: the trials whose models it deleted now and the bytes freed,
    the trials kept as the best and those kept as registered versions."""

    deleted: list[int]
    freed: int
    kept: list[int]
    registered: list[int]


def collect_models(chosen: Sweep, storage_url: str, keep: int, say: Callable[[str], None] = _silent) -> Collected:
    """Delete the logged models of all but the ``keep`` best trials of the study (and those the
    registry holds, and running trials'; ``track.collect``) and record them in the study
    (``StudyAttrs.models_collected``). Holds the study's models lock exclusively: no register
    chooses, confirms or registers a model while this deletes."""
    from cifar_exp.sweep import storage
    from cifar_exp.track import collect

    study = storage.load_existing(storage_url, chosen.name)
    with storage.models_lock(storage_url, study, chosen.name, shared=False,
                             on_wait=lambda: say(f"waiting for a register of {chosen.name} to finish")):
        gone = StudyAttrs.of(study).models_collected
        done = collect.collect(study.get_trials(deepcopy=False), chosen.objectives, keep, gone)
        if done.deleted:  # after the deletion: a collection cut short is finished by the next one
            for key, value in StudyAttrs.encode(models_collected=gone | set(done.deleted)).items():
                study.set_user_attr(key, value)
    return Collected(list(done.deleted), done.freed, list(done.plan.kept), list(done.plan.registered))
