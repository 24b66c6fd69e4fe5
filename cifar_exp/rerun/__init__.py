"""Reruns: rebuild a logged trial from what MLflow and the study recorded, train it again, compare.

A trial's MLflow run holds everything a rerun needs: every ``TrainConfig`` value, ``seed`` and
``epochs`` as params; the data source and checksum, the sweep seed (which fixes the validation
split), the validation fraction, the determinism mode, backend, package versions and device as
tags; the sweep file itself as the artifact ``sweep.yaml``. ``load_original`` reads and checks
them; ``rerun`` trains the same configuration into a new run tagged ``rerun_of``; ``compare``
says, value by value, whether the rerun reproduced the original.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_exp import lifecycle, track
from cifar_exp.config import HYPERMODEL_FIELDS, Sweep, TrainConfig, UserError
from cifar_exp.config.records import TrialAttrs, TrialRecipe
from cifar_exp.config.sweepfile import parse_sweep
from cifar_exp.training import backend

RERUN_TAG = "rerun_of"
# Wall-clock time is never reproducible (every metric named *_seconds: epochs, the first step, a
# trial's phases; and images_per_second), nor are the system/ metrics (the machine, not the
# model); every other per-epoch metric must be.
UNREPRODUCIBLE = ("images_per_second",)
# Logged once when a trial completes (step 0), not per epoch: compared like the test metrics.
FINAL_METRICS = ("param_count",)


def reproducible(key: str) -> bool:
    """Whether a rerun must reproduce the metric ``key`` (timings and system metrics need not)."""
    return not (key.endswith("_seconds") or key in UNREPRODUCIBLE or key.startswith(track.SYSTEM_PREFIX))


def final(key: str) -> bool:
    """Whether the metric ``key`` is logged once at the end of a trial (test metrics and the like)."""
    return key.startswith("test_") or key in FINAL_METRICS


EPOCH_METRICS_ORDER = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


@dataclass(frozen=True)
class Original:
    """A logged trial, rebuilt: its run, its sweep (with the overrides it ran under), its
    configuration, seed, epoch budget and per-epoch metrics."""

    run: track.RunRecord
    sweep: Sweep
    cfg: TrainConfig
    recipe: TrialRecipe  # what the run records: seed, epochs, split, data, mode, the TrainConfig values
    history: dict[str, list[float]]  # Keras logs key -> value per epoch
    test: dict[str, float]  # test_* metrics and param_count (complete trials only)
    hyperparameters: dict[str, Any] | None = None  # a hypermodel trial's, typed

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def state(self) -> str:
        return self.run.tags.get("state", self.run.status)

    @property
    def trial_number(self) -> str:
        return self.run.tags.get("trial_number", "?")

    @property
    def epochs_logged(self) -> int:
        return len(self.history.get("loss", []))


def find_trial_run(storage_url: str, name: str, number: int) -> str:
    """The MLflow run id of trial ``number`` of the study ``name`` in ``storage_url``."""
    from cifar_exp.sweep.storage import load_existing

    study = load_existing(storage_url, name)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise UserError(f"study '{name}' has no trial {number} (it has trials 0 to {len(trials) - 1})")
    run_id = TrialAttrs.of(trials[number]).mlflow_run_id
    if not run_id:
        raise UserError(f"trial {number} of study '{name}' has no MLflow run (it died before one was created)")
    return str(run_id)


def load_original(run_id: str) -> Original:
    """The trial logged as ``run_id``, rebuilt from its ``TrialRecipe`` and sweep file, and checked;
    ``UserError`` names what is missing."""
    try:
        run = track.get_run(run_id)
    except LookupError:
        raise UserError(f"no run '{run_id}' in this MLflow store: check the run id, or --tracking-uri") from None
    if "seed" not in run.params or "epochs" not in run.params or "trial_number" not in run.tags:
        raise UserError(f"run {run_id} is not a trial of a cifar_exp sweep (it has no seed and epochs); "
                        f"give a trial's run id, not a study's parent run")
    text = track.read_text(run_id, "sweep.yaml")
    if text is None:
        raise UserError(f"run {run_id} has no sweep.yaml artifact, so it cannot be rebuilt; "
                        f"rerun a trial of a newer sweep")
    # The recipe is all a rerun reads of the run's params and tags: its split and data first (no
    # TrainConfig values: which to read depends on the sweep file, checked against it here).
    head = TrialRecipe.from_run(run_id, run.params, run.tags, fields=())
    if hashlib.sha256(text.encode()).hexdigest() != head.sweep_sha256:
        raise UserError(f"the sweep.yaml of run {run_id} does not match its sweep_sha256 tag: the artifact "
                        f"was modified after the trial ran")
    sweep = parse_sweep(head.sweep, text, Path(f"run {run_id} sweep.yaml"))
    where = f"run {run_id}"
    recipe = TrialRecipe.from_run(run_id, run.params, run.tags, HYPERMODEL_FIELDS if sweep.hypermodel else None)
    sweep = dataclasses.replace(
        sweep, epochs=recipe.epochs, sampler=dataclasses.replace(sweep.sampler, seed=recipe.sweep_seed),
        data=dataclasses.replace(sweep.data, source=recipe.data_source,
                                 validation_fraction=recipe.validation_fraction, train_images=recipe.train_images))
    hyperparameters = None
    if sweep.hypermodel:
        text = track.read_text(run_id, "hyperparameters.json")
        if text is None:
            raise UserError(f"{where}: a hypermodel trial without hyperparameters.json cannot be rebuilt")
        hyperparameters = json.loads(text)
    for key in sweep.space:
        if key not in recipe.values and sweep.active(key, recipe.values):
            raise UserError(f"{where}: the searched parameter '{key}' was not logged")
    for key, fixed in sweep.fixed.items():
        if key in recipe.values and recipe.values[key] != fixed:
            raise UserError(f"{where}: param {key}={recipe.values[key]} contradicts the sweep file's fixed "
                            f"{key}: {fixed}")
    history = {key: track.metric_history(run_id, key) for key in run.metrics
               if not final(key) and reproducible(key)}
    original = Original(run, sweep, sweep.train_config(recipe.values), recipe, history,
                        {k: v for k, v in run.metrics.items() if final(k)}, hyperparameters)
    if original.epochs_logged == 0:
        reason = run.tags.get("fail_reason", "")
        raise UserError(f"run {run_id} logged no epoch ({original.state}{': ' + reason if reason else ''}); "
                        f"there is nothing to reproduce")
    return original


def differences(original: Original, identity: Mapping[str, str], deterministic: bool) -> list[str]:
    """What differs between the original's process and this one: backend, versions, device,
    determinism mode. Any of them may change the numbers."""
    found = []
    for key in (*backend.IDENTITY_TAGS, "deterministic"):
        now = str(deterministic).lower() if key == "deterministic" else identity[key]
        before = original.run.tags.get(key, "not recorded")
        if before != now:
            found.append(f"{key}: original {before}, now {now}")
    return found


def check_data(original: Original, source: str, checksum: str) -> None:
    """Refuse data whose checksum is not the original's."""
    expected = original.recipe.data_checksum
    if checksum != expected:
        raise UserError(f"data checksum differs: run {original.run.run_id} trained on "
                        f"{original.run.tags.get('data_source')} with sha256 {expected}, but {source} has "
                        f"sha256 {checksum}; pass --data with the original data")


@dataclass
class Outcome:
    """What the rerun produced, in its own MLflow run: per-epoch metrics, test metrics (a complete
    rerun's), and the exception that ended training, if one did."""

    run_id: str
    history: dict[str, list[float]]
    test: dict[str, float]
    error: str = ""


class Replay:
    """A rerun's part of its trial (a ``lifecycle.Engine``): collect what it computes, and when
    it ends compare it with the original (``comparison``), the verdict tagged on its run."""

    stopping = False

    def __init__(self, original: Original, tolerance: float,
                 on_epoch: Callable[[int, Mapping[str, float]], None] | None = None) -> None:
        self.original, self.tolerance, self.on_epoch = original, tolerance, on_epoch
        self.outcome = Outcome("", {}, {})
        self.comparison: Comparison | None = None

    def opened(self, run_id: str) -> None:
        self.outcome.run_id = run_id

    def steps(self, epoch: int, step: int, steps: int) -> None:
        pass  # the rerun command prints whole epochs

    def epoch(self, epoch: int, logs: Mapping[str, float], replayed: bool) -> None:
        for key, value in logs.items():
            if reproducible(key):
                self.outcome.history.setdefault(key, []).append(value)
        if self.on_epoch is not None:
            self.on_epoch(epoch, logs)

    def ended(self, outcome: lifecycle.Outcome) -> dict[str, Any]:
        if isinstance(outcome, lifecycle.Failed) and outcome.interrupted:
            return {}
        if isinstance(outcome, lifecycle.Failed):
            self.outcome.error = outcome.reason
        if isinstance(outcome, lifecycle.Completed):
            self.outcome.test = {k: v for k, v in track.get_run(outcome.run_id).metrics.items() if final(k)}
        self.comparison = compare(self.original, self.outcome, self.tolerance)
        return {"rerun_match": str(self.comparison.matched).lower(),
                "rerun_max_abs_diff": self.comparison.max_abs_diff, "rerun_tolerance": self.tolerance}


def plan(original: Original, *, identity: Mapping[str, str], deterministic: bool,
         tags: Mapping[str, str]) -> lifecycle.TrialPlan:
    """The rerun of ``original``: its configuration with its seed, into a new run (same
    experiment, same params, its recipe's tags, tagged ``rerun_of``), its hypermodel with the
    hyperparameters it logged. A trial that stopped early (pruned, interrupted, failed) is
    replayed for as many epochs as it logged, with its full-length learning-rate schedule."""
    run = original.run
    model = values = None
    if original.sweep.hypermodel:
        from cifar_exp.training import hypermodel  # imports keras: after the CLI has set up the environment

        model, values = hypermodel.load(original.sweep.hypermodel), hypermodel.fixed(original.hyperparameters or {})
    return lifecycle.TrialPlan(
        original.sweep, dataclasses.replace(original.recipe, deterministic=deterministic), "rerun", original.cfg,
        run.experiment_id, title=f"{original.sweep.name} trial {original.trial_number} (rerun)",
        tags={**tags, **identity, RERUN_TAG: run.run_id, "rerun_of_trial": original.trial_number,
              "rerun_of_state": original.state},
        name=f"rerun-of-trial-{original.trial_number}", params=run.params, hypermodel=model, hyperparameters=values,
        stop_after=None if original.state == "COMPLETE" else original.epochs_logged)


def rerun(original: Original, splits: Any, *, identity: Mapping[str, str], deterministic: bool,
          tags: Mapping[str, str], tolerance: float = 0.0,
          on_epoch: Callable[[int, Mapping[str, float]], None] | None = None) -> tuple[Outcome, Comparison]:
    """Train ``original`` again (``plan``) through ``lifecycle.run_trial`` and compare it, value by
    value (``compare``, within ``tolerance``); its run ends with the verdict (``rerun_match``,
    ``rerun_max_abs_diff``, ``rerun_tolerance``). Ctrl-C ends it KILLED and goes on."""
    replay = Replay(original, tolerance, on_epoch)
    lifecycle.run_trial(plan(original, identity=identity, deterministic=deterministic, tags=tags), splits, replay)
    assert replay.comparison is not None
    return replay.outcome, replay.comparison


@dataclass(frozen=True)
class Start:
    """What a rerun is about to train: ``epochs`` of the original's budget, and how this process
    differs from the original's (``differences``)."""

    epochs: int
    differences: list[str]


def reproduce(original: Original, source: str, *, deterministic: bool, tolerance: float, tags: Mapping[str, str],
              on_start: Callable[[Start], None] | None = None,
              on_epoch: Callable[[int, Mapping[str, float]], None] | None = None) -> tuple[Outcome, Comparison]:
    """The rerun command: ``source``'s data, refused before anything is written unless its
    checksum is the original's (``check_data``); the original's splits; deterministic kernels as
    ``deterministic`` says; ``on_start`` told what is about to run; then ``rerun``."""
    from cifar_exp import data  # imports keras: after the caller set the backend
    from cifar_exp.training import backend

    dataset = data.load(source)
    check_data(original, source, dataset.checksum)
    splits = data.splits(original.sweep, dataset)
    backend.use_deterministic_ops(deterministic)
    identity = backend.identity()
    if on_start is not None:
        epochs = original.sweep.epochs if original.state == "COMPLETE" else original.epochs_logged
        on_start(Start(epochs, differences(original, identity, deterministic)))
    return rerun(original, splits, identity=identity, deterministic=deterministic, tags=tags, tolerance=tolerance,
                 on_epoch=on_epoch)


@dataclass(frozen=True)
class Comparison:
    """Original vs rerun, value by value. ``epochs[e][metric]`` and ``test[metric]`` hold
    ``(original, rerun)``; ``rerun`` is None where the rerun has no value."""

    metrics: tuple[str, ...]
    epochs: list[dict[str, tuple[float, float | None]]]
    test: dict[str, tuple[float, float | None]]
    tolerance: float
    failure: str  # why the outcome differs beyond the numbers ("" if it does not)

    def values(self) -> list[tuple[float, float | None]]:
        return [pair for row in self.epochs for pair in row.values()] + list(self.test.values())

    @property
    def max_abs_diff(self) -> float:
        return max((abs(b - a) for a, b in self.values() if b is not None and not same(a, b)), default=0.0)

    @property
    def mismatches(self) -> int:
        return sum(b is None or not (same(a, b) or abs(b - a) <= self.tolerance) for a, b in self.values())

    @property
    def matched(self) -> bool:
        return not self.failure and self.mismatches == 0


def same(a: float, b: float | None) -> bool:
    """Bit-identical for reporting purposes: equal, or both NaN."""
    return b is not None and (a == b or (math.isnan(a) and math.isnan(b)))


def compare(original: Original, outcome: Outcome, tolerance: float) -> Comparison:
    """Compare every per-epoch metric the original logged, and its test metrics."""
    metrics = tuple(sorted(original.history, key=lambda k: (
        EPOCH_METRICS_ORDER.index(k) if k in EPOCH_METRICS_ORDER else len(EPOCH_METRICS_ORDER), k)))
    epochs = []
    for epoch in range(original.epochs_logged):
        row = {}
        for key in metrics:
            before, after = original.history[key], outcome.history.get(key, [])
            if epoch < len(before):
                row[key] = (before[epoch], after[epoch] if epoch < len(after) else None)
        epochs.append(row)
    test = {key: (value, outcome.test.get(key)) for key, value in sorted(original.test.items())}
    failure = ""
    original_failure = original.run.tags.get("fail_reason", "") if original.state == "FAIL" else ""
    if outcome.error and outcome.error.split(":")[0] != original_failure.split(":")[0]:
        failure = f"the rerun failed ({outcome.error}) where the original did not"
        if original_failure:
            failure = f"the rerun failed with {outcome.error}; the original with {original_failure}"
    return Comparison(metrics, epochs, test, tolerance, failure)
