"""One trial, from open to outcome, for every engine: ``run_trial(plan, splits, engine)``.

An engine decides what a trial is (a ``TrialPlan``: its recipe, configuration, hypermodel and
hyperparameters, checkpoint, time limit, where its run goes, whether its model is kept) and
hears it happen (an ``Engine``: ``opened``, each ``epoch``, ``ended``); ``run_trial`` does the
rest, in one order, read top to bottom below: open the run, check the static constraints, build
the hypermodel, train (time limit, checkpoint, program reuse, each epoch logged and handed to the
engine), evaluate (test, artifacts, model, verdict, phases), let the engine record the outcome,
end the run. The engines are adapters: the Optuna worker (``sweep.worker``), the KerasTuner
engine (``sweep.tuner``), reruns (``rerun``) and confirmation seeds (``registry.confirm``).

Decision: the engine records an outcome before the run ends (``ended``, then ``steps.end``): a
crash in between leaves a run to be closed as stale, never an engine's record (an Optuna trial
told COMPLETE) behind a run that says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from cifar_exp.config import Sweep, outcomes
from cifar_exp.config.records import TrialRecipe
from cifar_exp.lifecycle import steps
from cifar_exp.lifecycle.outcome import (
    Closed,
    Completed,
    Failed,
    Infeasible,
    Interruption,
    Outcome,
    Prune,
    Pruned,
    TimeLimit,
    TrialTimeout,
    failure_reason,
)
from cifar_exp.lifecycle.plan import TrialPlan
from cifar_exp.lifecycle.steps import Busy, end

if TYPE_CHECKING:
    from cifar_exp.data import Splits
    from cifar_exp.training.programs import Programs

__all__ = ["Busy", "Closed", "Completed", "Engine", "Failed", "Infeasible", "Interruption", "Outcome", "Prune",
           "Pruned", "TimeLimit", "TrialPlan", "TrialTimeout", "end", "failure_reason", "recipe", "run_trial"]


def recipe(sweep: Sweep, seed: int, epochs: int, values: Mapping[str, Any], data_checksum: str) -> TrialRecipe:
    """The recipe of a trial of ``sweep`` (its source, split and mode as the sweep gives them)."""
    return TrialRecipe(sweep=sweep.name, sweep_sha256=sweep.content_hash, sweep_seed=sweep.sampler.seed,
                       validation_fraction=sweep.data.validation_fraction, train_images=sweep.data.train_images,
                       data_source=sweep.data.source, data_checksum=data_checksum,
                       deterministic=sweep.deterministic, seed=seed, epochs=epochs, values=dict(values))


class Engine(Protocol):
    """What a trial's engine hears, in order: ``opened`` (the run exists), ``steps`` now and then
    inside an epoch (``step`` of ``steps`` training steps of the 0-based ``epoch`` done; at most
    every ``steps.PROGRESS_SECONDS``, none where training runs an epoch as one program), ``epoch`` after each
    epoch is logged (``replayed``: an epoch a taken-over checkpoint held, judged when it ran; it
    may raise ``Prune``, an ``Interruption``, or anything to fail the trial), then ``ended`` with
    the outcome, before the run ends: the engine records it (tells Optuna, answers its tuner,
    keeps it for a comparison) and returns tags for the run's end. ``stopping``: the engine was
    told to stop, so an exception now is an interruption (a signal raised inside Keras can
    surface as another exception on its way out)."""

    @property
    def stopping(self) -> bool: ...

    def opened(self, run_id: str) -> None: ...

    def steps(self, epoch: int, step: int, steps: int) -> None: ...

    def epoch(self, epoch: int, logs: Mapping[str, float], replayed: bool) -> None: ...

    def ended(self, outcome: Outcome) -> Mapping[str, Any]: ...


def run_trial(plan: TrialPlan, splits: Splits, engine: Engine, *, programs: Programs | None = None,
              started: float | None = None, claim_seconds: float = 0.0, busy: Busy | None = None) -> Outcome:
    """Conduct one trial: the only place a trial's run is opened, trained, evaluated and ended.
    ``programs``: the engine's compiled programs, reused for a seen structure; ``started``: the
    trial's start (``time.perf_counter``, before claiming it), for ``first_step_seconds``;
    ``claim_seconds``: how long the engine took to get it; ``busy``: the engine's flag for where
    a signal may raise. Returns the outcome; an interruption ends the run KILLED, is recorded, and
    goes on (raised again)."""
    run = steps.Run(plan, busy or Busy())
    run.open(claim_seconds, splits)
    engine.opened(run.run_id)
    try:
        outcome = _conduct(run, splits, engine, programs, started)
    except (Interruption, KeyboardInterrupt):
        _close(run, engine, Failed(run.run_id, "interrupted", interrupted=True, epochs_run=run.epochs_run))
        raise
    except Exception as exc:  # trials fail alone: any exception is the trial's fail_reason
        interrupted = engine.stopping
        failed = Failed(run.run_id, "interrupted" if interrupted else run.failure(exc), interrupted, run.epochs_run)
        _close(run, engine, failed)
        if interrupted:
            raise Interruption() from exc
        return failed
    _close(run, engine, outcome)
    return outcome


def _conduct(run: steps.Run, splits: Splits, engine: Engine, programs: Programs | None,
             started: float | None) -> Completed | Pruned | Infeasible:
    """The trial's outcome (not recorded yet): infeasible before training, pruned, or complete."""
    plan = run.plan
    static = run.static_metrics(len(splits.class_names))
    broken = outcomes.broken(plan.sweep.constraints, static)
    if broken:
        return run.infeasible(static, broken)
    custom = None
    if plan.hypermodel is not None:
        from cifar_exp.training import hypermodel  # imports keras: after the engine set up the process

        plan.hypermodel.build(plan.hyperparameters)  # declares (so samples) every active hyperparameter
        run.log_hyperparameters()
        custom = hypermodel.custom_model(plan.hypermodel, plan.hyperparameters)
    try:
        result = run.train(splits, engine.epoch, custom=custom, programs=programs, started=started,
                           on_steps=engine.steps)
    except Prune as exc:
        return run.pruned(splits, str(exc))
    if plan.hypermodel is not None:  # hyperparameters first declared in the hypermodel's fit
        run.log_hyperparameters()
    if plan.stop_after is not None:  # a replay of a trial that stopped early: no test, no model
        return run.pruned(splits, f"replayed {run.epochs_run} of {plan.recipe.epochs} epochs, as its original")
    return run.complete(result, splits)


def _close(run: steps.Run, engine: Engine, outcome: Outcome) -> None:
    """The engine records ``outcome``, then the run ends with it (and the engine's tags)."""
    extra = engine.ended(outcome)
    steps.end(run.run_id, outcome, extra, trial=run.plan.number, registrable=run.registrable)
