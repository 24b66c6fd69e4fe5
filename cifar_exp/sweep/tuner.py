"""``--engine keras-tuner``: a sweep's space searched by KerasTuner's own tuners, every trial
trained and tracked in MLflow exactly as the Optuna engine does it (same experiment, params,
per-epoch metrics, artifacts, model), so that the engines compare side by side in the MLflow UI
(runs are tagged ``engine``).

Which tuner: the sweep's ``pruner: hyperband`` gives ``keras_tuner.Hyperband`` (``max_epochs`` =
``epochs``, ``factor`` = ``reduction_factor``; its trial budget is Hyperband's own), otherwise
``sampler: random`` gives ``RandomSearch`` and any other sampler ``BayesianOptimization``, each
for ``trials`` trials. Decisions: trials run in this one process, one after another (KerasTuner's
own parallelism needs its gRPC chief/worker setup); a Hyperband trial trains from scratch for its
``tuner/epochs`` instead of resuming the weights of its parent trial, so every run is a
complete, rerunnable trial. A sweep's ``hypermodel`` is handed to the tuner as it is (KerasTuner
declares its space by building it) and trains as with the Optuna engine. KerasTuner's state
lives in ``<store>/keras_tuner/<sweep>``: the same command resumes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import keras_tuner

from cifar_exp import data, lifecycle, track
from cifar_exp.config import Settings, Sweep, UserError
from cifar_exp.config.records import trial_seed
from cifar_exp.sweep import events, sidecar
from cifar_exp.training import backend, hypermodel
from cifar_exp.training.programs import Programs

ENGINE_TAG = "engine"


def declare(sweep: Sweep, hp: keras_tuner.HyperParameters) -> None:
    """Declare ``sweep.space`` on ``hp``: one ``hp.Int/Float/Choice`` per dimension, under the
    same name, inside a ``conditional_scope`` per condition on another dimension (conditions on
    fixed values hold by validation)."""
    for name, dim in sweep.space.items():
        with contextlib.ExitStack() as scopes:
            for parent, values in dim.when:
                if parent in sweep.space:
                    scopes.enter_context(hp.conditional_scope(parent, list(values)))
            sampling = "log" if dim.log else "linear"
            if dim.type == "categorical":
                hp.Choice(name, list(dim.choices))
            elif dim.type == "int":
                assert dim.low is not None and dim.high is not None
                hp.Int(name, int(dim.low), int(dim.high), step=int(dim.step) if dim.step else None,
                       sampling=sampling)
            else:
                assert dim.low is not None and dim.high is not None
                hp.Float(name, dim.low, dim.high, step=dim.step, sampling=sampling)


def sampled(sweep: Sweep, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
    """The active values of the sweep's own dimensions in ``hp`` (a KerasTuner trial's)."""
    return {name: hp.values[name] for name in sweep.space if name in hp.values and hp.is_active(name)}


@dataclass(frozen=True)
class Outcome:
    experiment_id: str
    parent_run_id: str
    tuner: str
    counts: dict[str, int]
    best: list[dict[str, Any]]  # best first: trial, value, run_id, params


OnEvent = Callable[[events.Event, events.Tally], None]


def tuner_class(sweep: Sweep) -> tuple[type, dict[str, Any]]:
    """The KerasTuner tuner for ``sweep`` (see the module docstring) and its budget arguments."""
    if sweep.pruner.name == "hyperband":
        return keras_tuner.Hyperband, dict(max_epochs=sweep.epochs, factor=sweep.pruner.reduction_factor,
                                           hyperband_iterations=1)
    budget = dict(max_trials=sweep.trials or 1_000_000)
    if sweep.sampler.name == "random":
        return keras_tuner.RandomSearch, budget
    return keras_tuner.BayesianOptimization, budget


def run(settings: Settings, on_event: OnEvent = lambda event, tally: None) -> Outcome:
    """Run (or resume) the sweep with KerasTuner in this process."""
    sweep = settings.sweep
    backend.use_deterministic_ops(sweep.deterministic)
    track.configure(settings.tracking_uri)
    experiment = track.experiment_id(sweep.name)
    splits = data.splits(sweep, data.load(sweep.data.source))
    directory = sidecar.folder(settings.storage) / "keras_tuner"
    parent_file = directory / sweep.name / "mlflow_parent_run_id"
    metric = sweep.objective.metric
    hp = keras_tuner.HyperParameters()
    declare(sweep, hp)
    base, budget = tuner_class(sweep)
    tags = {**settings.tags, "sweep": sweep.name, "sweep_file": str(sweep.path), "sweep_sha256": sweep.content_hash,
            "objective": f"{sweep.objective.direction} {metric}", ENGINE_TAG: "keras-tuner",
            "keras_tuner_tuner": base.__name__, "epochs": str(sweep.epochs), "budget_trials": str(sweep.trials),
            "deterministic": str(sweep.deterministic).lower()}
    parent_file.parent.mkdir(parents=True, exist_ok=True)
    existing = parent_file.read_text().strip() if parent_file.is_file() else None
    parent = track.start_parent(experiment, existing, f"{sweep.name}-keras-tuner", tags)
    parent_file.write_text(parent)
    # A sweep's hypermodel is KerasTuner's own: the tuner declares its space by building it.
    trials = _Trials(settings, experiment, parent, splits, on_event,
                     hypermodel.load(sweep.hypermodel) if sweep.hypermodel else None)
    tuner = type(f"Tracked{base.__name__}", (base,), {"run_trial": trials.run_trial})(
        hypermodel=trials.model, objective=keras_tuner.Objective(metric, "max" if trials.tally.maximize else "min"),
        hyperparameters=hp, seed=sweep.sampler.seed, directory=str(directory), project_name=sweep.name,
        overwrite=False, max_consecutive_failed_trials=sweep.max_consecutive_failures, **budget)
    started = time.time()
    try:
        tuner.search(verbose=0)
    except RuntimeError as exc:  # KerasTuner stops after too many consecutive failed trials
        track.end_run(parent, "FAILED", {"fail_reason": str(exc).splitlines()[0]})
        raise UserError(f"keras-tuner stopped the sweep: {str(exc).splitlines()[0]}") from None
    except KeyboardInterrupt:
        track.end_run(parent, "KILLED", {"fail_reason": "interrupted"})
        raise
    return _finish(tuner, trials, experiment, parent, base.__name__, time.time() - started)


def _finish(tuner: Any, trials: _Trials, experiment: str, parent: str, name: str, seconds: float) -> Outcome:
    """End the parent run with the best trial; the outcome for the command to print."""
    metric = trials.sweep.objective.metric
    done = list(tuner.oracle.trials.values())
    counts = {state: sum(str(t.status) == state for t in done) for state in ("COMPLETED", "FAILED", "INVALID")}
    best = [{"trial": int(t.trial_id), "value": t.score, "params": trials.values(t.hyperparameters)}
            for t in tuner.oracle.get_best_trials(5)]
    final: dict[str, Any] = {"trials_finished": len(done), "seconds": round(seconds, 1)}
    if best:
        final.update({"best_trial": best[0]["trial"], **{f"best.{k}": v for k, v in best[0]["params"].items()}})
        track.log_metrics(parent, {f"best_{metric}": float(best[0]["value"])}, step=best[0]["trial"])
    track.end_run(parent, "FINISHED", final)
    return Outcome(experiment, parent, name, counts, best)


class _Trials:
    """KerasTuner's ``run_trial``: one tracked trial (``trial``), its events and their tally."""

    def __init__(self, settings: Settings, experiment: str, parent: str, splits: Any, on_event: OnEvent,
                 model: Any) -> None:
        self.settings, self.sweep = settings, settings.sweep
        self.experiment, self.parent, self.splits = experiment, parent, splits
        self.on_event, self.model = on_event, model
        self.identity = backend.identity()
        self.programs = Programs()  # compiled programs kept for the next trials, as a worker keeps them
        self.tally = events.Tally(maximize=self.sweep.objective.direction == "maximize")

    def emit(self, event: events.Event) -> None:
        if isinstance(event, events.Ended):
            self.tally.add(event)
        self.on_event(event, self.tally)

    def tuned(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        """The hypermodel's own hyperparameters in ``hp`` (none without a hypermodel)."""
        if self.model is None:
            return {}
        return {k: v for k, v in hp.values.items() if not k.startswith("tuner/") and k not in self.sweep.space
                and hp.is_active(k)}

    def values(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        return {**sampled(self.sweep, hp), **self.tuned(hp)}

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        # A bound method in the tuner's class dict: called with KerasTuner's arguments, no tuner.
        # The trial is planned here and conducted by lifecycle.run_trial, as for the Optuna
        # engine; KerasTuner's part is the answer (the objective's value) and FailedTrialError.
        sweep = self.sweep
        started = time.perf_counter()  # the trial's start, for its first_step_seconds
        values, number = trial.hyperparameters.values, int(trial.trial_id)
        params = sampled(sweep, trial.hyperparameters)
        epochs = int(values.get("tuner/epochs", sweep.epochs))
        logged = {k: v for k, v in sweep.logged_params(params).items()
                  # a hypermodel that overrides fit chooses its own batch size
                  if not (self.model is not None and k == "batch_size" and hypermodel.overrides_fit(self.model))}
        plan = lifecycle.TrialPlan(
            sweep, lifecycle.recipe(sweep, trial_seed(sweep.sampler.seed, number), epochs, logged,
                                    self.settings.data_checksum), "keras-tuner", sweep.train_config(params),
            self.experiment, title=f"{sweep.name} trial {number} (keras-tuner)",
            tags={**self.settings.tags, **self.identity, "keras_tuner_trial": trial.trial_id,
                  **{f"keras_tuner_{k[6:]}": v for k, v in values.items() if k.startswith("tuner/")}},
            parent_run_id=self.parent, number=number, hypermodel=self.model,
            hyperparameters=trial.hyperparameters if self.model is not None else None, own=self.tuned,
            time_limit=sweep.trial_timeout)
        answer = _Answer(self, number, epochs, self.values(trial.hyperparameters))
        try:
            outcome = lifecycle.run_trial(plan, self.splits, answer, programs=self.programs, started=started)
        finally:
            keras.backend.clear_session()
        if isinstance(outcome, lifecycle.Failed):
            self.emit(events.Ended(number, "FAIL", outcome.run_id, reason=outcome.reason))
            raise keras_tuner.errors.FailedTrialError(outcome.reason)
        assert isinstance(outcome, lifecycle.Completed), outcome  # no pruning, no constraints here
        self.emit(events.Ended(number, "COMPLETE", outcome.run_id, value=outcome.value,
                               test_accuracy=outcome.test_accuracy, degenerate=outcome.verdict.get("degenerate", "")))
        return {plan.sweep.objective.metric: outcome.value}


class _Answer:
    """KerasTuner's part of one trial (a ``lifecycle.Engine``): the sweep command hears it start
    and each epoch; the answer is ``run_trial``'s return."""

    stopping = False

    def __init__(self, trials: _Trials, number: int, epochs: int, values: dict[str, Any]) -> None:
        self.trials, self.number, self.epochs, self.values = trials, number, epochs, values

    def opened(self, run_id: str) -> None:
        self.trials.emit(events.Started(0, self.number, run_id, self.values))

    def steps(self, epoch: int, step: int, steps: int) -> None:
        self.trials.emit(events.Steps(self.number, epoch + 1, self.epochs, step, steps))

    def epoch(self, epoch: int, logs: Mapping[str, float], replayed: bool) -> None:
        metric = self.trials.sweep.objective.metric
        self.trials.emit(events.Epoch(self.number, epoch + 1, self.epochs, logs[metric], dict(logs)))

    def ended(self, outcome: lifecycle.Outcome) -> Mapping[str, Any]:
        return {}
