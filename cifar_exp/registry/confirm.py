"""A champion confirmed over seeds (``register NAME --seeds N``, ``confirm_seeds:``).

The best of many noisy trials scored higher than its settings deserve: its seed was lucky as
well. So the best ``confirm_candidates`` trials (on a multi-objective study, the front members
the rule admits, best first) are each trained again with ``N`` further seeds, as runs under the
study's parent tagged ``confirmation`` (the candidate's run id); the candidate's own seed is left
out of its numbers, since it is the one it was chosen on. The champion is the candidate with the
best mean objective. It takes the ``champion`` alias from the current champion only if a
one-sided Welch t-test on the two sets of seeds says its mean is better at ``ALPHA`` (0.05); with
no spread on either side (every seed the same), a better mean is enough. The current champion's
seeds are those its version recorded, or, for a champion registered without ``--seeds``, ``N``
seeds of its own trained now. The version's description carries the per-seed numbers, its tags
the means and spreads, and the candidate's run the per-class recall over the seeds
(``confirmation/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar_exp import lifecycle, track
from cifar_exp.config import Sweep, UserError, outcomes
from cifar_exp.config.records import TrialAttrs

ALPHA = 0.05
RULE = f"one-sided Welch t-test on the confirmation seeds' objective, p < {ALPHA}"
VALUES_TAG = "confirmation_values"  # a version's per-seed objective values, JSON


def seeds_for(seed: int, count: int) -> list[int]:
    """The ``count`` confirmation seeds of a trial of seed ``seed``: hashes of (seed, i), 31 bits,
    so a second confirmation of the same trial trains the same runs."""
    return [int.from_bytes(hashlib.sha256(f"{seed}:confirm:{i}".encode()).digest()[:4], "little") & 0x7FFFFFFF
            for i in range(count)]


@dataclass
class Seeds:
    """One candidate's confirmation: per seed, its objective's value, test accuracy and per-class
    recall, and the runs that trained them."""

    run_id: str  # the candidate trial's run
    trial: int | None
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    recall: dict[str, list[float]] = field(default_factory=dict)  # class -> per seed
    runs: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def spread(self, values: Sequence[float]) -> str:
        return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def welch_p(better: Sequence[float], worse: Sequence[float], direction: str) -> float:
    """The one-sided Welch p-value that ``better``'s mean beats ``worse``'s in ``direction``
    (maximize: higher). With no spread on either side: 0 if it beats it at all, else 1."""
    from scipy import stats

    if statistics.pvariance(better) == 0 and statistics.pvariance(worse) == 0:
        ahead = statistics.fmean(better) - statistics.fmean(worse)
        return 0.0 if (ahead > 0 if direction == "maximize" else ahead < 0) else 1.0
    alternative = "greater" if direction == "maximize" else "less"
    return float(stats.ttest_ind(better, worse, equal_var=False, alternative=alternative).pvalue)


def decide(challenger: Sequence[float], champion: Sequence[float], direction: str) -> tuple[bool, float]:
    """``(promoted, p)``: whether ``challenger``'s seeds beat ``champion``'s by ``RULE``."""
    p = welch_p(challenger, champion, direction)
    return (not math.isnan(p) and p < ALPHA), p


def candidates(trials: Sequence[Any], sweep: Sweep, rule: outcomes.Rule | None, count: int) -> list[Any]:
    """The ``count`` trials to confirm, best first: the rule's admitted front members, or the
    ranking's best; only trials with a logged model that are not degenerate."""
    from cifar_exp import registry

    done = registry.registrable(trials)
    pool = rule.admitted(done, sweep.objectives) if rule is not None else outcomes.ranked(done, sweep.objectives)
    if not pool:
        registry.refuse_degenerate(trials, sweep, rule)
        raise UserError("no completed feasible trial with a logged model meets the rule: run the sweep first, "
                        "or loosen --where")
    return pool[:count]


class Trainer:
    """Trains confirmation runs: the data each original trained on, loaded once per source."""

    def __init__(self, experiment: str, parent_run_id: str, tags: Mapping[str, str],
                 on_run: Callable[[str], None] = lambda line: None) -> None:
        import os

        import psutil

        from cifar_exp.sweep import liveness

        # Who trains the runs: a run left RUNNING by a register that is gone is closed by the next
        # register or sweep start (``sweep.supervisor.close_confirmations``).
        me = psutil.Process(os.getpid())
        process = {"confirmation_host": liveness.machine(), "confirmation_pid": str(me.pid),
                   "confirmation_started": repr(me.create_time())}
        self.experiment, self.parent, self.on_run = experiment, parent_run_id, on_run
        self.tags = {**tags, **process}
        self.programs: Any = None  # compiled programs, shared by the seeds of a structure (set on first use)
        self._splits: dict[tuple[Any, ...], Any] = {}

    def splits(self, original: Any) -> Any:
        from cifar_exp import data, rerun

        sweep = original.sweep
        key = (sweep.data.source, original.recipe.data_checksum, sweep.data.validation_fraction,
               sweep.sampler.seed, sweep.data.train_images)
        if key not in self._splits:
            dataset = data.load(sweep.data.source)
            rerun.check_data(original, sweep.data.source, dataset.checksum)
            self._splits[key] = data.splits(sweep, dataset)
        return self._splits[key]

    def confirm(self, run_id: str, count: int) -> Seeds:
        """Train the trial logged as ``run_id`` with ``count`` confirmation seeds: each seed is the
        rerun's plan (its configuration, hypermodel and hyperparameters) with another seed and no
        model kept, conducted by ``lifecycle.run_trial`` with this trainer's compiled programs."""
        import keras

        from cifar_exp import rerun
        from cifar_exp.training import programs

        original = rerun.load_original(run_id)
        splits = self.splits(original)
        self.programs = self.programs or programs.Programs()
        number = original.trial_number
        found = Seeds(run_id, int(number) if number.isdigit() else None)
        metric = original.sweep.objective.metric
        base = rerun.plan(original, identity={}, deterministic=original.recipe.deterministic, tags={})
        for seed in seeds_for(original.seed, count):
            plan = dataclasses.replace(
                base, recipe=dataclasses.replace(original.recipe, seed=seed), engine="confirmation",
                title=f"{original.sweep.name} trial {number}, confirmation seed {seed}",
                tags={**self.tags, track.PARENT_TAG: self.parent, "confirmation": run_id,
                      "confirmation_of_trial": number},
                experiment=self.experiment, name=f"confirm-trial-{number}-seed-{seed}", params=None, stop_after=None,
                keep_model=False)
            outcome = lifecycle.run_trial(plan, splits, _Seed(), programs=self.programs)
            keras.backend.clear_session()  # as a worker does between trials; the programs stay
            if not isinstance(outcome, lifecycle.Completed):
                raise UserError(f"confirmation seed {seed} of trial {number} did not complete "
                                f"({getattr(outcome, 'reason', type(outcome).__name__)}): nothing was registered")
            measured = outcome.measured
            found.seeds.append(seed)
            found.values.append(measured[metric])
            found.test_accuracy.append(measured["test_accuracy"])
            for name in splits.class_names:
                found.recall.setdefault(name, []).append(measured[f"test_recall_{name}"])
            found.runs.append(outcome.run_id)
            self.on_run(f"  trial {number} seed {seed}: {metric}={measured[metric]:.4f} "
                        f"test_accuracy={measured['test_accuracy']:.4f} (run {outcome.run_id})")
        return found


class _Seed:
    """A confirmation seed's part of its trial (a ``lifecycle.Engine``): nothing to record; the
    outcome ``run_trial`` returns is what ``Trainer.confirm`` keeps."""

    stopping = False

    def opened(self, run_id: str) -> None:
        pass

    def steps(self, epoch: int, step: int, steps: int) -> None:
        pass

    def epoch(self, epoch: int, logs: Mapping[str, float], replayed: bool) -> None:
        pass

    def ended(self, outcome: lifecycle.Outcome) -> dict[str, Any]:
        return {}


def best(confirmed: Sequence[Seeds], direction: str) -> Seeds:
    """The candidate with the best mean objective (the earlier, better-ranked one on a tie)."""
    sign = 1.0 if direction == "maximize" else -1.0
    return max(confirmed, key=lambda c: sign * c.mean)  # max keeps the first of equals


def summary(found: Seeds, metric: str) -> tuple[str, dict[str, Any]]:
    """The lines and tags a version carries of ``found``: per seed, then means and spreads."""
    per_seed = "; ".join(f"seed {s}: {metric}={v:.4f}, test_accuracy={a:.4f}"
                         for s, v, a in zip(found.seeds, found.values, found.test_accuracy, strict=True))
    recall = ", ".join(f"{name} {found.spread(values)}" for name, values in found.recall.items())
    text = (f"Confirmed over {len(found.seeds)} further seeds ({RULE} decides promotion): "
            f"{metric} {found.spread(found.values)}, test_accuracy {found.spread(found.test_accuracy)}.\n"
            f"Per seed: {per_seed}.\nPer-class test recall (mean ± std over the seeds): {recall}.")
    tags = {VALUES_TAG: json.dumps(found.values), "confirmation_seeds": json.dumps(found.seeds),
            "confirmation_runs": json.dumps(found.runs), f"{metric}_mean": found.mean, f"{metric}_std": found.std,
            "test_accuracy_mean": statistics.fmean(found.test_accuracy),
            "test_accuracy_std": statistics.stdev(found.test_accuracy) if len(found.test_accuracy) > 1 else 0.0}
    return text, tags


def log_per_class(found: Seeds, title: str) -> None:
    """The per-class recall over the confirmation seeds (mean and spread) on the candidate's run:
    ``confirmation/per_class_recall.json`` and ``.png``."""
    from cifar_exp.metrics import plots

    table = {name: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "seeds": v}
             for name, v in found.recall.items()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "confirmation"
        folder.mkdir()
        (folder / "per_class_recall.json").write_text(json.dumps(table, indent=2))
        plots.recall_png({k: np.asarray(v) for k, v in found.recall.items()}, folder / "per_class_recall.png", title)
        track.log_dir(found.run_id, Path(tmp))


@dataclass(frozen=True)
class Confirmed:
    """What ``promote`` did: the version registered, the candidates' confirmations, the champion
    before it (and its seeds), whether it was promoted, the test's p-value and why."""

    version: track.models.Version
    trial: Any  # the candidate registered (an Optuna FrozenTrial)
    chosen: Seeds
    candidates: list[Any]  # the trials confirmed, best ranked first
    confirmed: list[Seeds]  # theirs, in that order
    champion: track.models.Version | None
    champion_seeds: Seeds | None
    promoted: bool
    p: float | None
    reason: str


def champion_seeds(champion: track.models.Version, confirmed: Sequence[Seeds], count: int,
                   trainer: Trainer) -> Seeds:
    """The current champion's seeds: recorded on its version, confirmed now among the candidates,
    or (a champion registered without ``--seeds``) ``count`` seeds of its trial trained now."""
    recorded = json.loads(track.models.version_tags(champion.name, champion.version).get(VALUES_TAG, "[]"))
    if len(recorded) > 1:
        return Seeds(champion.run_id, None, values=[float(v) for v in recorded])
    for found in confirmed:
        if found.run_id == champion.run_id:
            return found
    trainer.on_run(f"champion version {champion.version} was registered without --seeds: confirming it too")
    return trainer.confirm(champion.run_id, count)


def promote(sweep: Sweep, name: str, trials: Sequence[Any], count: int, rule: outcomes.Rule | None,
            trainer: Trainer) -> Confirmed:
    """Confirm the candidates with ``count`` seeds each, register the best mean as a version of
    ``name`` (alias ``challenger``), and move ``champion`` to it if ``RULE`` says it beats the champion."""
    from cifar_exp import registry

    pool = candidates(trials, sweep, rule, sweep.confirm_candidates)
    registry.check_models(pool)  # before minutes of training, not after
    metric, direction = sweep.objective.metric, sweep.objective.direction
    confirmed = []
    for t in pool:
        trainer.on_run(f"confirming trial {t.number} with {count} seeds")
        confirmed.append(trainer.confirm(str(TrialAttrs.of(t).mlflow_run_id), count))
    chosen = best(confirmed, direction)
    trial = pool[confirmed.index(chosen)]
    description, tags = registry.describe(trial, sweep, rule)
    text, more = summary(chosen, metric)
    version = registry.register_version(name, trial, f"{description}\n{text}", {**tags, **more})
    log_per_class(chosen, f"{sweep.name} trial {trial.number}: test recall over {count} confirmation seeds")
    champion = track.models.alias_version(name, registry.CHAMPION)
    track.models.set_alias(name, registry.CHALLENGER, version.version)
    mine = f"{metric} {chosen.spread(chosen.values)}"
    if champion is None:
        track.models.set_alias(name, registry.CHAMPION, version.version)
        return Confirmed(version, trial, chosen, pool, confirmed, None, None, True, None,
                         f"first champion of {name} ({mine})")
    if champion.version == version.version:
        return Confirmed(version, trial, chosen, pool, confirmed, champion, chosen, False, None,
                         f"version {version.version} is already champion")
    theirs = champion_seeds(champion, confirmed, count, trainer)
    promoted, p = decide(chosen.values, theirs.values, direction)
    versus = (f"{mine} against champion version {champion.version}'s {theirs.spread(theirs.values)} "
              f"({len(chosen.values)} and {len(theirs.values)} seeds): p = {p:.3g}")
    if promoted:
        track.models.set_alias(name, registry.CHAMPION, version.version)
        return Confirmed(version, trial, chosen, pool, confirmed, champion, theirs, True, p,
                         f"better by {RULE}: {versus}")
    return Confirmed(version, trial, chosen, pool, confirmed, champion, theirs, False, p,
                     f"not better by {RULE}: {versus}; champion unchanged")
