"""The steps of one trial's run, each a method of ``Run``; ``lifecycle.run_trial`` is the only
caller, and keeps their order. Imports neither Optuna nor Keras (``training`` is imported when a
trial trains)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cifar_exp import track
from cifar_exp.config import outcomes
from cifar_exp.lifecycle.outcome import (
    Closed,
    Completed,
    Infeasible,
    Outcome,
    Pruned,
    TimeLimit,
    end_tags,
    failure_reason,
    kept_metrics,
)
from cifar_exp.metrics import degenerate

if TYPE_CHECKING:
    from cifar_exp.data import Splits
    from cifar_exp.lifecycle.plan import TrialPlan
    from cifar_exp.training.clock import Clock
    from cifar_exp.training.programs import Programs
    from cifar_exp.training.train import CustomModel, TrainResult

EpochHook = Callable[[int, Mapping[str, float], bool], None]  # epoch, logs, replayed
StepsHook = Callable[[int, int, int], None]  # epoch (0-based), steps done, steps in the epoch
# How often a trial tells its engine how far into an epoch it is: often enough that a terminal
# moves, rarely enough that a worker's queue carries a few events a minute per trial.
PROGRESS_SECONDS = 2.0


class _Pace:
    """Passes the steps done in an epoch to ``hook``, at most every ``PROGRESS_SECONDS``."""

    def __init__(self, hook: StepsHook) -> None:
        self.hook, self.current, self.told = hook, 0, time.monotonic()

    def epoch(self, epoch: int) -> None:
        self.current = epoch

    def step(self, step: int, steps: int | None) -> None:
        now = time.monotonic()
        if steps and step and now - self.told >= PROGRESS_SECONDS:
            self.told = now
            self.hook(self.current, step, steps)


def judge(history: Mapping[str, Any], y_prob: Any, splits: Any) -> dict[str, str]:
    """``{"degenerate": why}`` for a trial whose numbers mean nothing (``metrics.degenerate``;
    ``y_prob`` None for a trial that never reached the test set), ``{}`` otherwise."""
    why = degenerate(history, y_prob, len(splits.y_val), splits.class_names)
    return {"degenerate": why} if why else {}


def end(run_id: str, outcome: Outcome | Closed, extra: Mapping[str, Any] | None = None,
        trial: int | None = None, registrable: bool = False) -> None:
    """End the MLflow run ``run_id`` as ``outcome`` says (``outcome.end_tags``), with ``extra``
    tags: the one way a trial's run is ended, by ``run_trial``, and by the recovery of a run whose
    trial ended elsewhere (``Closed``) or whose process is gone (``Failed``) alike. The run of a
    sweep's ``trial`` is renamed for its end (``track.view.trial_run_name``). ``registrable``: the
    completed trial's model is one the registry may choose (``Run.registrable``); its LoggedModel
    is tagged ``registrable`` first, so that a model of a trial the study does not count as
    complete never carries the tag."""
    model = outcome.model_uri if isinstance(outcome, Completed) or (
        isinstance(outcome, Closed) and outcome.state == "COMPLETE") else ""
    if registrable and model:
        track.models.tag_model(model, {"registrable": "true"})
    status, tags = end_tags(outcome)
    if trial is not None:
        tags[track.view.RUN_NAME_TAG] = track.view.trial_run_name(trial, tags["state"], interrupted=status == "KILLED")
    track.end_run(run_id, status, {**tags, **(extra or {})})


@dataclass
class Busy:
    """Whether Keras is computing the running trial: where a signal may raise (the time limit,
    a worker's SIGTERM). An engine that handles signals passes its own to ``run_trial``."""

    training: bool = False


@dataclass
class Run:
    """One trial's run while ``run_trial`` conducts it: its id, the metrics logged so far, the
    seconds by phase, its time limit."""

    plan: TrialPlan
    busy: Busy = field(default_factory=Busy)
    run_id: str = ""
    history: dict[str, list[float]] = field(default_factory=dict)
    # Seconds by phase, logged when the trial ends: claim_seconds (the engine's), then those of
    # training (``training.clock.Clock``), artifacts_seconds and model_seconds (``complete``).
    phases: dict[str, float] = field(default_factory=dict)
    clock: Clock | None = None
    limit: TimeLimit = field(init=False)
    # The data as the run's dataset input (name, digest), which the model's metrics are linked to.
    dataset: tuple[str, str] | None = None
    # Whether the model logged is one the registry may choose: a sweep's trial, its numbers not
    # degenerate, every constraint met (``complete``); ``run_trial`` passes it to ``end``.
    registrable: bool = False
    _first_step: dict[str, float] = field(default_factory=dict)
    _epochs: dict[int, track.MetricGroup] = field(default_factory=dict)  # each epoch's metrics as logged

    def __post_init__(self) -> None:
        self.limit = TimeLimit(self.plan.time_limit, lambda: self.busy.training)

    @property
    def metric(self) -> str:
        return self.plan.sweep.objective.metric

    @property
    def epochs_run(self) -> int:
        return max((len(values) for values in self.history.values()), default=0)

    def open(self, claim_seconds: float, splits: Splits | None = None) -> str:
        """Open the run: under the plan's parent run as trial ``number`` (a sweep's trial), or as a
        run named ``name``; its params (default: the recipe's), tags, and the data it trains on
        (``splits``' sizes) as a dataset input. The sweep file is logged by ``train``, where a full
        disk fails the trial rather than the engine."""
        plan = self.plan
        params = plan.recipe.to_params() if plan.params is None else plan.params
        tags = {**plan.tags, **plan.recipe.to_tags(), "engine": plan.engine}
        if plan.parent_run_id is not None and plan.number is not None:
            self.run_id = track.start_trial_run(plan.experiment, plan.parent_run_id, plan.number, params=params,
                                                tags=tags)
        else:
            self.run_id = track.start_run(plan.experiment, plan.name, params, tags)
        if splits is not None:
            recipe = plan.recipe
            self.dataset = track.view.log_dataset(
                self.run_id, recipe.data_source, recipe.data_checksum,
                {"train_images": len(splits.y_train), "validation_images": len(splits.y_val),
                 "test_images": len(splits.y_test)})
        self.phases = {"claim_seconds": claim_seconds}
        return self.run_id

    def static_metrics(self, num_classes: int) -> dict[str, float]:
        """The metrics the sweep constrains that the configuration fixes before training
        (``param_count``), so a trial that cannot be feasible is never trained; ``{}`` where none
        is constrained (and for a hypermodel, whose model only its build knows)."""
        sweep = self.plan.sweep
        if "param_count" not in sweep.constraints or sweep.hypermodel:
            return {}
        from cifar_exp.training import models  # imports keras: after the engine set up the process

        return {"param_count": float(models.param_count(self.plan.cfg, num_classes))}

    def infeasible(self, metrics: Mapping[str, float], reason: str) -> Infeasible:
        """The outcome of a trial its static ``metrics`` rule out, logged to its run."""
        track.log_metrics(self.run_id, dict(metrics))
        return Infeasible(self.run_id, dict(metrics), reason)

    def log_hyperparameters(self) -> None:
        """The plan's hypermodel hyperparameters declared so far (``TrialPlan.own``): MLflow params,
        and typed in ``hyperparameters.json`` (what a rerun builds from). Names that are also sweep
        dimensions are refused: one name, one concept."""
        values, sweep = self.plan.own(self.plan.hyperparameters), self.plan.sweep
        clashes = sorted(set(values) & set(sweep.space))
        if clashes:
            raise ValueError(f"the hypermodel's hyperparameter {clashes[0]} is also a dimension of the sweep: "
                             f"rename one of them")
        logged = track.get_run(self.run_id).params
        track.log_params(self.run_id, {k: v for k, v in values.items() if k not in logged})
        track.log_text(self.run_id, json.dumps(dict(values), sort_keys=True), "hyperparameters.json")

    def train(self, splits: Splits, on_epoch: EpochHook, *, custom: CustomModel | None, programs: Programs | None,
              started: float | None, on_steps: StepsHook | None = None) -> TrainResult:
        """Train the plan's configuration on ``splits`` with the recipe's seed and epochs, under
        the time limit; each epoch logged, checked for the objective's metric, then handed to
        ``on_epoch`` (replayed False; the epochs a taken-over checkpoint holds, True). The model
        kept is the sweep's ``model_epoch`` (best or last); ``on_steps`` hears the steps done inside
        an epoch, at most every ``PROGRESS_SECONDS``. ``started``: the trial's start
        (``time.perf_counter``), for its ``first_step_seconds``. A checkpoint is not used for a
        ``custom`` model (a hypermodel's, which trains as it was compiled)."""
        from cifar_exp.training import clock, train  # imports keras: after the engine set up the process

        plan = self.plan
        track.log_text(self.run_id, plan.sweep.text, "sweep.yaml")
        self.clock = clock.Clock()
        # The run's one observer of training: each epoch logged and judged, the first step timed,
        # a taken-over checkpoint's epochs replayed.
        observer = train.Observer(on_epoch_end=lambda epoch, logs: self._epoch(epoch, logs, on_epoch),
                                  on_first_step=self._on_first_step,
                                  on_resume=lambda history: self._resumed(history, on_epoch))
        if on_steps is not None:
            # At a step's begin, not its end: Keras dispatches batch-end hooks asynchronously only
            # when no callback has one, and a begin hook takes no logs, so the device never waits.
            pace = _Pace(on_steps)
            observer.on_epoch_begin = lambda epoch, logs=None: pace.epoch(epoch)
            observer.on_train_batch_begin = (
                lambda step, logs=None: pace.step(step, observer.params.get("steps")))
        options = train.TrainOptions(stop_after=plan.stop_after, custom=custom, started=started, programs=programs,
                                     clock=self.clock, checkpoint=None if custom is not None else plan.checkpoint,
                                     best_by=plan.sweep.best_by)
        self.busy.training = True
        try:
            with self.limit:
                result = train.train(plan.cfg, splits, seed=plan.recipe.seed, epochs=plan.recipe.epochs,
                                     callbacks=[observer], options=options)
        finally:
            self.busy.training = False
        self.limit.check()
        return result

    def _on_first_step(self, seconds: float) -> None:
        # From the trial's start (claim, run, build, compile) to its first launched training
        # step; logged with the first epoch's metrics, in the same batch.
        self._first_step["first_step_seconds"] = seconds

    def _log(self, epoch: int, logs: Mapping[str, float]) -> None:
        stamp = track.log_metrics(self.run_id,
                                  {**logs, **{track.view.TIME_PREFIX + k: v for k, v in self._first_step.items()}},
                                  step=epoch)
        self._epochs[epoch] = track.MetricGroup(dict(logs), epoch, stamp)
        self._first_step.clear()
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def _epoch(self, epoch: int, logs: Mapping[str, float], on_epoch: EpochHook) -> None:
        self.busy.training = False
        if self.metric not in logs:
            raise ValueError(f"training logs no {self.metric} (only {', '.join(sorted(logs))}): compile the model "
                             f"with metrics=['accuracy']")
        self._log(epoch, logs)
        on_epoch(epoch, logs, False)
        self.limit.check()
        self.busy.training = True

    def _resumed(self, history: Mapping[str, list[float]], on_epoch: EpochHook) -> None:
        """The epochs a taken-over checkpoint holds (trained by the trial ``resumed_from``): logged
        to this run and handed to ``on_epoch`` as replayed (they were judged when they ran); the
        run is tagged ``resumed_from`` and ``resumed_epochs``."""
        self.busy.training = False
        done = min(len(values) for values in history.values())
        for epoch in range(done):
            logs = {key: values[epoch] for key, values in history.items()}
            self._log(epoch, logs)
            on_epoch(epoch, logs, True)
        track.set_tags(self.run_id, {"resumed_from": self.plan.resumed_from, "resumed_epochs": done})
        self.busy.training = True

    def complete(self, result: TrainResult, splits: Splits) -> Completed:
        """A finished training's outcome: its test evaluation and artifacts, its speed where the
        sweep is judged on it, the verdict on its numbers, its model unless the plan keeps none,
        the seconds by phase (metrics ``*_seconds``) and the tag ``compiled``.

        The model is the epoch ``model_epoch`` kept (best or last): an MLflow LoggedModel of that
        step, with the run's params, tags naming its trial and verdict, and linked to the data,
        the metrics that judge it (that epoch's, the test set's, its speed), so that
        ``mlflow.search_logged_models`` ranks a study's models by the sweep's objective as the
        project does (docs/tracking.md)."""
        clock = time.perf_counter()
        kept = result.kept_epoch  # the objective's value and every per-epoch metric: that epoch's
        title = f"{self.plan.title} (model of epoch {kept + 1})".strip()
        tested = track.log_test(self.run_id, result, splits, title=title)
        phases = {**self.phases, **result.phases, "artifacts_seconds": time.perf_counter() - clock}
        metrics = {self.metric: result.history[self.metric][kept], "test_loss": result.test_loss,
                   "test_accuracy": result.test_accuracy, "param_count": float(result.model.count_params()),
                   **kept_metrics(result.history, kept)}
        groups = [self._epochs[kept], tested] if kept in self._epochs else [tested]
        if self.plan.sweep.measures_speed:
            from cifar_exp.training import latency

            clock = time.perf_counter()
            speed = latency.measure(result.model, splits.x_test)
            groups.append(track.MetricGroup(speed, 0, track.log_metrics(self.run_id, speed)))
            metrics.update(speed)
            phases["latency_seconds"] = time.perf_counter() - clock
        verdict = judge(result.history, result.y_prob, splits)
        broken = outcomes.broken(self.plan.sweep.constraints, metrics)
        model_uri = ""
        if self.plan.keep_model:
            clock = time.perf_counter()
            number = self.plan.number
            tags = {"sweep": self.plan.recipe.sweep, **({"trial_number": number} if number is not None else {}),
                    "model_epoch": kept + 1, **verdict, **({"infeasible": broken} if broken else {})}
            model_uri = track.models.log_model(self.run_id, result.model, splits.x_test[:2], splits.class_names,
                                               step=kept, params=track.get_run(self.run_id).params, tags=tags,
                                               metrics=groups, dataset=self.dataset,
                                               name="model" if number is None else track.view.trial_run_name(number))
            phases["model_seconds"] = phases.get("model_seconds", 0.0) + time.perf_counter() - clock
            self.registrable = number is not None and not verdict and not broken
        self._log_phases(phases, result.compiled)
        return Completed(self.run_id, metrics[self.metric], result.test_loss, result.test_accuracy, model_uri,
                         verdict, phases, result.compiled, self.epochs_run, metrics, kept + 1,
                         {**metrics, **tested.metrics})

    def pruned(self, splits: Splits, reason: str) -> Pruned:
        """The outcome of a trial stopped early: the epochs it ran judged, its phases logged
        (training's up to the stop)."""
        assert self.clock is not None, "pruned before training"
        self.clock.lap("fit_seconds")
        if self.history.get("loss"):  # its curves up to the stop, as a complete trial's
            track.log_curves(self.run_id, self.history, f"{self.plan.title} (stopped after epoch {self.epochs_run})")
        phases = {**self.phases, **self.clock.phases}
        self._log_phases(phases, self.clock.origin())
        return Pruned(self.run_id, judge(self.history, None, splits), phases, self.clock.origin(), self.epochs_run,
                      reason)

    def failure(self, exc: BaseException) -> str:
        """The ``fail_reason`` of this trial ending with ``exc`` (the time limit's, if it expired:
        the alarm may surface as another exception raised on the way out of Keras)."""
        return self.limit.reason if self.limit.expired else failure_reason(exc)

    def _log_phases(self, phases: Mapping[str, float], compiled: str) -> None:
        track.log_metrics(self.run_id, {track.view.TIME_PREFIX + k: v for k, v in phases.items()})
        track.set_tags(self.run_id, {"compiled": compiled, "feed": self.clock.feed if self.clock else "fit"})
