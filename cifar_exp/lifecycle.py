"""One trial's run, from open to outcome, for every engine: ``TrialRun``.

The Optuna worker (``sweep.worker``), the KerasTuner engine (``sweep.tuner``) and reruns
(``rerun``) each create a ``TrialRun`` and let it conduct the trial: open its MLflow run with the
tags every trial carries and what a rerun needs (``TrialRecipe``), train it (compiled-program
reuse, checkpoints, the trial's time limit, each epoch logged, the first with
``first_step_seconds``, and the objective checked), then end it as ``complete`` (test metrics,
artifacts, model, verdict on degenerate numbers, seconds by phase), ``pruned`` or ``failed``.
Each engine keeps only its own part: the worker asks, reports, prunes and tells Optuna, the
KerasTuner engine answers its tuner, a rerun compares. They ride on the run's hooks
(``on_epoch``, ``on_replayed``) and on the ``before_end`` of ``complete`` and ``pruned``, so a
behaviour added here reaches all three. Imports neither Optuna nor Keras (``training`` is
imported when a trial trains).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cifar_exp import track
from cifar_exp.config import Sweep
from cifar_exp.config.goals import EPOCH_METRICS, Objective
from cifar_exp.config.records import TrialRecipe
from cifar_exp.evaluate import degenerate

if TYPE_CHECKING:
    from cifar_exp.data import Splits
    from cifar_exp.training.checkpoints import Slot
    from cifar_exp.training.clock import Clock
    from cifar_exp.training.programs import Programs
    from cifar_exp.training.train import CustomModel, TrainResult

EpochHook = Callable[[int, Mapping[str, float]], None]


def recipe(sweep: Sweep, seed: int, epochs: int, values: Mapping[str, Any], data_checksum: str) -> TrialRecipe:
    """The recipe of a trial of ``sweep`` (its source, split and mode as the sweep gives them)."""
    return TrialRecipe(sweep=sweep.name, sweep_sha256=sweep.content_hash, sweep_seed=sweep.sampler.seed,
                       validation_fraction=sweep.data.validation_fraction, train_images=sweep.data.train_images,
                       data_source=sweep.data.source, data_checksum=data_checksum,
                       deterministic=sweep.deterministic, seed=seed, epochs=epochs, values=dict(values))


def log_hyperparameters(run_id: str, values: Mapping[str, Any], sweep: Sweep) -> None:
    """A hypermodel's hyperparameters: MLflow params, and typed in ``hyperparameters.json`` (what a
    rerun builds from). Names that are also sweep dimensions are refused: one name, one concept."""
    clashes = sorted(set(values) & set(sweep.space))
    if clashes:
        raise ValueError(f"the hypermodel's hyperparameter {clashes[0]} is also a dimension of the sweep: "
                         f"rename one of them")
    logged = track.get_run(run_id).params
    track.log_params(run_id, {k: v for k, v in values.items() if k not in logged})
    track.log_text(run_id, json.dumps(dict(values), sort_keys=True), "hyperparameters.json")


def failure_reason(exc: BaseException) -> str:
    """The one-line ``fail_reason`` of a trial that raised ``exc``."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


class TrialTimeout(Exception):
    """A trial ran past the sweep's ``trial_timeout``."""


class TimeLimit:
    """The sweep's ``trial_timeout`` over one trial (a context manager, in the main thread: SIGALRM).
    Past it, the alarm raises ``TrialTimeout`` at once if ``interruptible()`` (Keras is computing);
    elsewhere (a storage or tracking write, which must not be cut in two) ``check()``, called at
    the next safe point, raises it. Without ``seconds`` it never expires."""

    def __init__(self, seconds: float | None, interruptible: Callable[[], bool]) -> None:
        self.seconds, self.interruptible = seconds, interruptible
        self.expired = False
        self.reason = f"TrialTimeout: ran past trial_timeout ({seconds:g} s)" if seconds else ""
        self._before: Any = None

    def _ring(self, signum: int, frame: object) -> None:
        self.expired = True
        if self.interruptible():
            raise TrialTimeout(self.reason.removeprefix("TrialTimeout: "))

    def check(self) -> None:
        if self.expired:
            raise TrialTimeout(self.reason.removeprefix("TrialTimeout: "))

    def __enter__(self) -> TimeLimit:
        if self.seconds:
            self._before = signal.signal(signal.SIGALRM, self._ring)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._before)


def kept_metrics(result: TrainResult) -> dict[str, float]:
    """The per-epoch metrics (``config.goals.EPOCH_METRICS``) of the epoch whose model ``result`` kept."""
    return {k: v[result.kept_epoch] for k, v in result.history.items() if k in EPOCH_METRICS}


def judge(history: Mapping[str, Sequence[float]], y_prob: Any, splits: Any) -> dict[str, str]:
    """``{"degenerate": why}`` for a trial whose numbers mean nothing (``evaluation.degenerate``;
    ``y_prob`` None for a trial that never reached the test set), ``{}`` otherwise."""
    why = degenerate(history, y_prob, len(splits.y_val), splits.class_names)
    return {"degenerate": why} if why else {}




@dataclass(frozen=True)
class Completed:
    """A complete trial's outcome, as logged: the objective's value (that of ``model_epoch``, the epoch
    whose weights it kept, counted from 1 as the terminal and the curves count: its metrics are
    MLflow's step ``model_epoch - 1``), test metrics, model, verdict (``{"degenerate": why}`` or
    ``{}``), seconds by phase, how its program came (``compiled``: new, reused or cache; see
    ``training.train.TrainResult``), and ``metrics``: every value it can be judged on
    (``config.goals.METRICS``: the objective's, the test metrics, ``param_count``, and
    ``latency_ms``/``throughput`` where measured)."""

    value: float
    test_loss: float
    test_accuracy: float
    model_uri: str
    verdict: dict[str, str]
    phases: dict[str, float]
    compiled: str
    epochs_run: int
    metrics: dict[str, float] = field(default_factory=dict)
    model_epoch: int = 0

    def values(self, objectives: Sequence[Objective]) -> list[float]:
        """The values of ``objectives``, in order (what Optuna is told)."""
        return [self.metrics[o.metric] for o in objectives]


@dataclass(frozen=True)
class Pruned:
    """A pruned trial's outcome, as logged: verdict, seconds by phase, ``compiled``, epochs run."""

    verdict: dict[str, str]
    phases: dict[str, float]
    compiled: str
    epochs_run: int


@dataclass
class TrialRun:
    """One trial of ``sweep`` with ``recipe``, run by ``engine`` (the ``engine`` tag: optuna,
    keras-tuner, or rerun): ``open`` it, ``train`` it, end it with ``complete``, ``pruned`` or
    ``failed``. ``tags``: what the engine adds to every run (provenance, process identity, its
    own details). ``on_epoch`` hooks run after each epoch is logged (report, prune, events: they
    may raise to end training); ``on_replayed`` hooks hear the epochs a resumed trial's checkpoint
    holds. ``programs`` (a worker's compiled programs), ``checkpoint`` (a file and its owner, to save the state
    to after every epoch, and to resume from) and ``time_limit`` (seconds) are the engine's to give."""

    sweep: Sweep
    recipe: TrialRecipe
    engine: str
    tags: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""
    programs: Programs | None = None
    checkpoint: Slot | None = None
    resumed_from: int | None = None  # the trial whose checkpoint this one took over
    time_limit: float | None = None
    on_epoch: list[EpochHook] = field(default_factory=list)
    on_replayed: list[EpochHook] = field(default_factory=list)
    run_id: str = ""
    history: dict[str, list[float]] = field(default_factory=dict)
    # Seconds by phase, logged when the trial ends: claim_seconds (the engine's), then those of
    # training (``training.clock.Clock``), artifacts_seconds and model_seconds (``complete``).
    phases: dict[str, float] = field(default_factory=dict)
    resumed_epochs: int = 0  # epochs a taken-over checkpoint held
    training: bool = False  # while Keras computes: a signal may raise there (``TimeLimit``, a stop)
    clock: Clock | None = None
    limit: TimeLimit = field(init=False)
    _first_step: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.limit = TimeLimit(self.time_limit, lambda: self.training)

    @property
    def metric(self) -> str:
        return self.sweep.objective.metric

    @property
    def epochs_run(self) -> int:
        return max((len(values) for values in self.history.values()), default=0)

    def open(self, experiment: str, *, parent_run_id: str | None = None, number: int | None = None,
             name: str = "", params: Mapping[str, Any] | None = None, claim_seconds: float = 0.0) -> str:
        """Open the run: under ``parent_run_id`` as trial ``number`` (a sweep's trial), or as a run
        named ``name`` (a rerun); ``params`` (default: the recipe's) and the tags. The sweep file
        is logged by ``train``, where a full disk fails the trial rather than the engine."""
        params = self.recipe.to_params() if params is None else params
        tags = {**self.tags, **self.recipe.to_tags(), "engine": self.engine}
        if parent_run_id is not None and number is not None:
            self.run_id = track.start_trial_run(experiment, parent_run_id, number, params=params, tags=tags)
        else:
            self.run_id = track.start_run(experiment, name, params, tags)
        self.phases = {"claim_seconds": claim_seconds}
        return self.run_id

    def train(self, splits: Splits, cfg: Any, *, custom: CustomModel | None = None, started: float | None = None,
              stop_after: int | None = None) -> TrainResult:
        """Train ``cfg`` (a ``TrainConfig``) on ``splits`` with the recipe's seed and epochs, under
        the time limit; each epoch logged, checked for the objective's metric, then handed to the
        ``on_epoch`` hooks; the model kept is the sweep's ``model_epoch`` (best or last).
        ``started``: the trial's start (``time.perf_counter``), for its
        ``first_step_seconds``. A checkpoint is not used for a ``custom`` model (a hypermodel's,
        which trains as it was compiled)."""
        from cifar_exp.training import clock, train  # imports keras: after the engine set up the process

        track.log_text(self.run_id, self.sweep.text, "sweep.yaml")
        self.clock = clock.Clock()
        self.training = True
        try:
            with self.limit:
                result = train.train(cfg, splits, epochs=self.recipe.epochs, seed=self.recipe.seed,
                                     on_epoch=[self._epoch], custom=custom, on_first_step=self._on_first_step,
                                     started=started, programs=self.programs, clock=self.clock,
                                     checkpoint=None if custom is not None else self.checkpoint,
                                     on_resume=self._resumed, stop_after=stop_after, best_by=self.sweep.best_by)
        finally:
            self.training = False
        self.limit.check()
        return result

    def _on_first_step(self, seconds: float) -> None:
        # From the trial's start (claim, run, build, compile) to its first launched training
        # step; logged with the first epoch's metrics, in the same batch.
        self._first_step["first_step_seconds"] = seconds

    def _log(self, epoch: int, logs: Mapping[str, float]) -> None:
        track.log_metrics(self.run_id, {**logs, **self._first_step}, step=epoch)
        self._first_step.clear()
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def _epoch(self, epoch: int, logs: Mapping[str, float]) -> None:
        self.training = False
        if self.metric not in logs:
            raise ValueError(f"training logs no {self.metric} (only {', '.join(sorted(logs))}): compile the model "
                             f"with metrics=['accuracy']")
        self._log(epoch, logs)
        for hook in self.on_epoch:
            hook(epoch, logs)
        self.limit.check()
        self.training = True

    def _resumed(self, history: Mapping[str, list[float]]) -> None:
        """The epochs a taken-over checkpoint holds (trained by the trial ``resumed_from``): logged
        to this run and handed to the ``on_replayed`` hooks (not to ``on_epoch``: they were judged
        when they ran); the run is tagged ``resumed_from`` and ``resumed_epochs``."""
        self.training = False
        done = min(len(values) for values in history.values())
        for epoch in range(done):
            logs = {key: values[epoch] for key, values in history.items()}
            self._log(epoch, logs)
            for hook in self.on_replayed:
                hook(epoch, logs)
        self.resumed_epochs = done
        track.set_tags(self.run_id, {"resumed_from": self.resumed_from, "resumed_epochs": done})
        self.training = True

    def complete(self, result: TrainResult, splits: Splits,
                 before_end: Callable[[Completed], None] = lambda outcome: None) -> Completed:
        """Log a finished training's test evaluation, artifacts and model (of its ``model_epoch``),
        judge its numbers, log the seconds by phase (metrics ``*_seconds``) and the tag
        ``compiled``; call ``before_end``
        (the engine records the outcome: a crash after it leaves the run to be closed as stale,
        never an engine's record behind its run); end the run FINISHED, ``state=COMPLETE``, tagged
        ``model_epoch``."""
        clock = time.perf_counter()
        title = f"{self.title} (model of epoch {result.kept_epoch + 1})".strip()
        track.log_test(self.run_id, result, splits, title=title)
        artifacts, clock = time.perf_counter() - clock, time.perf_counter()
        model_uri = track.models.log_model(self.run_id, result.model, splits.x_test[:2], splits.class_names)
        phases = {**self.phases, **result.phases, "artifacts_seconds": artifacts,
                  "model_seconds": result.phases.get("model_seconds", 0.0) + time.perf_counter() - clock}
        kept = result.kept_epoch  # the objective's value and every per-epoch metric: that epoch's
        metrics = {self.metric: result.history[self.metric][kept], "test_loss": result.test_loss,
                   "test_accuracy": result.test_accuracy, "param_count": float(result.model.count_params()),
                   **kept_metrics(result)}
        if self.sweep.measures_speed:
            from cifar_exp.training import latency

            clock = time.perf_counter()
            speed = latency.measure(result.model, splits.x_test)
            track.log_metrics(self.run_id, speed)
            metrics.update(speed)
            phases["latency_seconds"] = time.perf_counter() - clock
        self._log_phases(phases, result.compiled)
        outcome = Completed(metrics[self.metric], result.test_loss, result.test_accuracy, model_uri,
                            judge(result.history, result.y_prob, splits), phases, result.compiled, self.epochs_run,
                            metrics, kept + 1)
        before_end(outcome)
        track.end_run(self.run_id, "FINISHED", {"state": "COMPLETE", "model_uri": model_uri, "model_epoch": kept + 1,
                                                **outcome.verdict})
        return outcome

    def confirmed(self, result: TrainResult, splits: Splits) -> dict[str, float]:
        """End a confirmation run (``rerun.confirm``): its test evaluation and artifacts, and its
        seconds by phase, but no model (the candidate's own is what a version registers); FINISHED,
        ``state=COMPLETE``, tagged ``model_epoch``. Returns the values it is judged on: the kept
        epoch's per-epoch metrics, the test metrics, per-class precision, recall and F1."""
        kept = result.kept_epoch
        title = f"{self.title} (model of epoch {kept + 1})".strip()
        measured = track.log_test(self.run_id, result, splits, title=title)
        self._log_phases({**self.phases, **result.phases}, result.compiled)
        track.end_run(self.run_id, "FINISHED", {"state": "COMPLETE", "model_epoch": kept + 1})
        return {**kept_metrics(result),
                "test_loss": result.test_loss, "test_accuracy": result.test_accuracy, **measured}

    def pruned(self, splits: Splits, before_end: Callable[[Pruned], None] = lambda outcome: None) -> Pruned:
        """End a trial its engine pruned: judge the epochs it ran, log its phases (training's up
        to the prune), call ``before_end``, end the run FINISHED, ``state=PRUNED``."""
        assert self.clock is not None, "pruned before training"
        self.clock.lap("fit_seconds")
        phases = {**self.phases, **self.clock.phases}
        self._log_phases(phases, self.clock.origin())
        outcome = Pruned(judge(self.history, None, splits), phases, self.clock.origin(), self.epochs_run)
        before_end(outcome)
        track.end_run(self.run_id, "FINISHED", {"state": "PRUNED", "pruned": "true", "pruned_epoch": self.epochs_run,
                                                **outcome.verdict})
        return outcome

    def static_metrics(self, cfg: Any, num_classes: int) -> dict[str, float]:
        """The metrics the sweep constrains that ``cfg`` fixes before training (``param_count``),
        so a trial that cannot be feasible is never trained; ``{}`` where none is constrained (and
        for a hypermodel, whose model only its build knows)."""
        if "param_count" not in self.sweep.constraints or self.sweep.hypermodel:
            return {}
        from cifar_exp.training import models  # imports keras: after the engine set up the process

        return {"param_count": float(models.param_count(cfg, num_classes))}

    def infeasible(self, metrics: Mapping[str, float], reason: str) -> None:
        """End a trial that its static ``metrics`` already rule out, untrained: they are logged,
        the run tagged ``infeasible`` with ``reason`` and ended FINISHED, ``state=PRUNED``."""
        track.log_metrics(self.run_id, dict(metrics))
        track.end_run(self.run_id, "FINISHED", {"state": "PRUNED", "pruned": "true", "pruned_epoch": 0,
                                                "infeasible": reason})

    def failed(self, reason: str, status: str = "FAILED") -> None:
        """End the run of a trial that failed (``status`` FAILED) or was interrupted (KILLED)."""
        end_failed(self.run_id, reason, status)

    def failure(self, exc: BaseException) -> str:
        """The ``fail_reason`` of this trial ending with ``exc`` (the time limit's, if it expired:
        the alarm may surface as another exception raised on the way out of Keras)."""
        return self.limit.reason if self.limit.expired else failure_reason(exc)

    def _log_phases(self, phases: Mapping[str, float], compiled: str) -> None:
        track.log_metrics(self.run_id, phases)
        track.set_tags(self.run_id, {"compiled": compiled, "feed": self.clock.feed if self.clock else "fit"})


def end_failed(run_id: str, reason: str, status: str = "FAILED") -> None:
    """End a failed trial's run: ``status`` FAILED, or KILLED for an interruption (also for a run
    whose trial's worker is gone: ``sweep.recovery.close_run``)."""
    track.end_run(run_id, status, {"state": "FAIL", "fail_reason": reason})
