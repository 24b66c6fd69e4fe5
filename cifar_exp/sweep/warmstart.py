"""Warm starts: a study begins with settings known to be good, before its sampler's own.

Two sources, applied once per study (the study records ``warm_started``), under the budget lock
so that hosts starting together enqueue them once: ``warm_start: {sweep: OTHER, top: K}`` (or
``--warm-start OTHER[:K]``), the K best complete feasible trials of the study OTHER in the same
storage; and ``enqueue:``, settings written in the sweep file. Each is enqueued as a trial with
the settings this space has and that fall in its ranges (a setting of OTHER's that this space
lacks or that is out of its range is dropped, and said so; the trial samples it afresh). They
count in the budget like any trial and carry ``warm_start`` (their source) in Optuna and on their
MLflow run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_exp.config import Sweep, UserError, outcomes
from cifar_exp.config.goals import Objective
from cifar_exp.config.records import StudyAttrs, TrialAttrs
from cifar_exp.config.values import within


def fitting(sweep: Sweep, params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``params`` this sweep's space takes as they are, and why each other one is dropped."""
    kept, dropped = {}, []
    for name, value in params.items():
        if name not in sweep.space:
            dropped.append(f"{name}={value} (not in this space)")
            continue
        why = within(sweep.space[name], value)
        if why:
            dropped.append(f"{name}={value} ({why})")
        else:
            kept[name] = value
    return kept, dropped


def sources(sweep: Sweep, storage: optuna.storages.BaseStorage) -> list[tuple[str, dict[str, Any]]]:
    """What the sweep starts with: ``(source, params)`` per trial, the other study's best first,
    then the file's ``enqueue:`` list. ``UserError`` names a missing study."""
    found: list[tuple[str, dict[str, Any]]] = []
    if sweep.warm_start is not None:
        other = sweep.warm_start.sweep
        try:
            study = optuna.load_study(study_name=other, storage=storage)
        except KeyError:
            names = ", ".join(n for n in optuna.get_all_study_names(storage) if n != sweep.name)
            raise UserError(f"warm_start: no study '{other}' in this storage (studies: {names or 'none'}): "
                            f"run that sweep first, or name another") from None
        directions = [Objective(direction=d.name.lower()) for d in study.directions]  # type: ignore[arg-type]
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        by_number = {t.number: t for t in complete}
        best = outcomes.ranked(complete, directions)[:sweep.warm_start.top]
        found += [(f"{other} trial {t.number}", dict(by_number[t.number].params)) for t in best]
    found += [(f"enqueue[{i}]", dict(params)) for i, params in enumerate(sweep.enqueue)]
    return found


def seed(study: optuna.Study, sweep: Sweep) -> list[str]:
    """Enqueue the sweep's warm start into ``study`` unless it has been (call under the budget
    lock); returns one line per trial enqueued and per setting dropped."""
    if StudyAttrs.of(study).warm_started or (sweep.warm_start is None and not sweep.enqueue):
        return []
    lines = []
    for source, params in sources(sweep, study._storage):
        kept, dropped = fitting(sweep, params)
        if not kept:
            lines.append(f"warm start from {source}: nothing this space takes ({'; '.join(dropped)})")
            continue
        study.enqueue_trial(kept, user_attrs=TrialAttrs.encode(warm_start=source), skip_if_exists=True)
        lines.append(f"warm start from {source}: {' '.join(f'{k}={v}' for k, v in kept.items())}"
                     + (f"; dropped {'; '.join(dropped)}" if dropped else ""))
    for key, value in StudyAttrs.encode(warm_started=True).items():
        study.set_user_attr(key, value)
    return lines
