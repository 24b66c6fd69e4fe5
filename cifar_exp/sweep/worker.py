"""A sweep's worker process: load the data once, then claim a trial from the study's budget, run
it, clear the Keras session and claim the next, until the budget, the deadline or a stop.

One trial here is ``lifecycle.run_trial`` with Optuna's part as its engine (``OptunaTrial``:
record the run on the trial, report each epoch, prune, tell). Every outcome reaches the sweep
command as an ``events`` event. A trial that
raised ends the process (exit ``EXIT_TRIAL_FAILED``), and the supervisor starts a fresh one: no
leaked memory or poisoned GPU state carries over.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

from cifar_exp import cluster, lifecycle, track
from cifar_exp.config import Settings, TrainConfig, UserError, outcomes
from cifar_exp.config.goals import SPEED_METRICS
from cifar_exp.config.records import TrialAttrs, trial_seed
from cifar_exp.sweep import events, liveness, recovery, sidecar, storage
from cifar_exp.sweep.pruning import Pruning
from cifar_exp.sweep.storage import Claim

EXIT_TRIAL_FAILED = 3  # a worker exits with this after a failed trial, to be replaced
EXIT_ORPHANED = 4  # a worker whose sweep command died, after its grace
ORPHAN_GRACE_SECONDS = 10.0  # a worker whose sweep command died gets this long to record its trial
WAIT_SECONDS = 2.0  # a worker with the budget all claimed polls this often for retries


class Interrupted(lifecycle.Interruption):
    """Raised in a worker on SIGTERM (a BaseException, so ``except Exception`` lets it through)."""


def main(settings: Settings, experiment: str, parent_run_id: str, stop: Any,
         queue: Any, worker_id: int, deadline: float | None, parent: int | None = None) -> None:
    """A worker process (the target the supervisor spawns): run trials while the budget and the
    deadline allow, until ``stop`` is set or the process ``parent`` (the sweep command) is gone."""
    if settings.log_file:  # before TensorFlow and MLflow print anything: they print to fds 1 and 2
        fd = os.open(settings.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    worker = Worker(settings, experiment, parent_run_id, queue, worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGTERM, worker.on_sigterm)
    if parent is not None:
        threading.Thread(target=_die_with_parent, args=(parent, queue), name="parent-watch", daemon=True).start()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the parent reports trials
    # Before Keras (and its backend) first touches CUDA: this worker's GPU and share of its memory.
    os.environ.update(cluster.devices(worker_id, settings.workers, settings.gpus))
    me = psutil.Process()
    with liveness.beating(liveness.path(settings.storage, me.pid, me.create_time()), settings.sweep.heartbeat_grace):
        if worker.prepare():
            worker.run(stop, deadline)


def _die_with_parent(parent: int, queue: Any, poll: float = 0.5) -> None:
    """From a daemon thread: once the sweep command (``parent``) is gone (SIGKILL, OOM kill; the
    worker is re-parented), stop as on SIGTERM (the trial ends as interrupted), and exit
    regardless after ``ORPHAN_GRACE_SECONDS``. A trial left RUNNING is failed and retried by the
    next start, as for any dead worker. Decision: workers never train on unsupervised; a killed
    command whose workers went on stacked workers on top of orphans at each restart."""
    while os.getppid() == parent:
        time.sleep(poll)
    queue.cancel_join_thread()  # exiting must not wait to flush events nobody will read
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_SECONDS)
    os._exit(EXIT_ORPHANED)


class Worker:
    """One worker's context (the sweep, its data, the queue to the sweep command) and its state:
    ``stop`` once SIGTERM came, ``training`` while Keras computes (where SIGTERM may raise)."""

    def __init__(self, settings: Settings, experiment: str, parent_run_id: str, queue: Any, worker_id: int) -> None:
        self.settings, self.sweep = settings, settings.sweep
        self.experiment, self.parent_run_id = experiment, parent_run_id
        self.queue, self.worker_id = queue, worker_id
        self.busy = lifecycle.Busy()  # whether Keras computes the running trial (where SIGTERM may raise)
        self.stop = False
        self.splits: Any = None
        self.tunable: Any = None  # the sweep's KerasTuner hypermodel, if it has one
        self.programs: Any = None  # the compiled programs kept for the next trials (programs.Programs)
        self.identity: dict[str, str] = {}

    def on_sigterm(self, signum: int, frame: object) -> None:
        # Raise only while Keras is computing: raising inside a storage write could leave the
        # journal's file lock held. Elsewhere the flag is checked at the next safe point.
        self.stop = True
        if self.training:
            raise Interrupted()

    def prepare(self) -> bool:
        """Load the data and check the sweep's models once; False (and a ``Fatal`` event) if the
        sweep cannot run at all: ImageNet weights missing offline, or a broken hypermodel."""
        import keras  # imported here: the sweep command never needs Keras

        from cifar_exp import data
        from cifar_exp.training import backend, hypermodel, models

        sweep = self.sweep
        backend.use_deterministic_ops(sweep.deterministic)
        self.identity = {**backend.identity(), **cluster.placement()}  # where its trials run: host, task or pod, GPUs
        track.configure(self.settings.tracking_uri)
        self.splits = data.splits(sweep, data.load(sweep.data.source))
        try:
            for name in sweep.imagenet_backbones():
                models.backbone(TrainConfig(model="transfer", backbone=name, weights="imagenet"))
            self.tunable = hypermodel.load(sweep.hypermodel) if sweep.hypermodel else None
        except UserError as exc:
            self.queue.put(events.Fatal(self.worker_id, str(exc)))
            return False
        keras.backend.clear_session()
        from cifar_exp.training import programs

        self.programs = programs.Programs()
        # What is loaded by now (TensorFlow, Keras, MLflow, the data) lives as long as the process:
        # frozen, the garbage collections after each trial and at exit no longer walk it. Measured
        # on a 2-core CPU machine: clearing after a trial 0.08-0.10 s instead of 0.85-0.96 s, the
        # process's exit 0.3 s instead of 2.1 s.
        gc.freeze()
        self.queue.put(events.Ready(self.worker_id))
        return True

    def run(self, stop: Any, deadline: float | None) -> None:
        """Claim and run trials until the budget is done, ``deadline`` (``time.time``) passes, or a stop."""
        import keras

        opened = storage.open_storage(self.settings.storage)
        while not self.stop and not stop.is_set() and (deadline is None or time.time() < deadline):
            started = time.perf_counter()  # the trial's start, for its first_step_seconds
            claimed = storage.claim(self.settings, opened)
            if claimed == "done":
                break
            if claimed == "wait":  # another worker's trial may still fail and be retried here
                stop.wait(WAIT_SECONDS)
                continue
            with recovery.heartbeat(opened, claimed.trial):
                ok = self.run_trial(claimed, started, time.perf_counter() - started, opened)
            # Memory must not grow from trial to trial: Keras' global state goes (and a garbage
            # collection with it); the compiled programs a worker keeps (at most programs.CAPACITY) stay.
            keras.backend.clear_session()
            if not ok:
                sys.exit(EXIT_TRIAL_FAILED)

    def run_trial(self, claimed: Claim, started: float, claim_seconds: float,
                  opened: optuna.storages.BaseStorage) -> bool:
        """Plan the ``claimed`` trial and hand it to ``lifecycle.run_trial`` with Optuna's part
        (``OptunaTrial``); False if it failed (the worker is then replaced). ``started`` is when
        the worker began the trial (``time.perf_counter``, before claiming it), ``claim_seconds``
        how long claiming took. The trial's checkpoint goes when it ends."""
        from cifar_exp.training import checkpoints  # Keras is imported by now

        sweep, trial = self.sweep, claimed.trial
        retry_of = TrialAttrs.of(trial).retry_of
        # A retry trains with its original's seed (the first of its chain's): resumed from the
        # original's checkpoint or not, it computes what the original would have.
        seed = trial_seed(sweep.sampler.seed, trial.number if retry_of is None
                          else recovery.first_of(claimed.study, int(retry_of)))
        plan = self.plan(claimed, seed, retry_of)
        engine = OptunaTrial(self, claimed, Pruning(self.settings, opened, trial), seed)
        try:
            outcome = lifecycle.run_trial(plan, self.splits, engine, programs=self.programs, started=started,
                                          claim_seconds=claim_seconds, busy=self.busy)
        except (lifecycle.Interruption, KeyboardInterrupt):
            # The checkpoint stays: the trial's retry resumes from it.
            self.queue.put(events.Ended(trial.number, "FAIL", engine.run_id, reason=events.INTERRUPTED,
                                        retried=True))
            raise SystemExit(0) from None
        if plan.checkpoint is not None:
            checkpoints.discard(plan.checkpoint.path)
        self.queue.put(ended_event(trial.number, outcome, sweep))
        return not isinstance(outcome, lifecycle.Failed)

    def plan(self, claimed: Claim, seed: int, retry_of: int | None) -> lifecycle.TrialPlan:
        """What the ``claimed`` trial is: its recipe and configuration, its run under the sweep's
        parent, the hypermodel sampled by the trial, its checkpoint and time limit."""
        from cifar_exp.sweep.hyperparameters import OptunaHyperParameters
        from cifar_exp.training import hypermodel

        sweep, trial, params = self.sweep, claimed.trial, claimed.params
        logged = {k: v for k, v in sweep.logged_params(params).items()
                  # a hypermodel that overrides fit chooses its own batch size
                  if not (self.tunable is not None and k == "batch_size" and hypermodel.overrides_fit(self.tunable))}
        warm = TrialAttrs.of(trial).warm_start
        return lifecycle.TrialPlan(
            sweep, lifecycle.recipe(sweep, seed, sweep.epochs, logged, self.settings.data_checksum), "optuna",
            sweep.train_config(params), self.experiment, title=f"{sweep.name} trial {trial.number}",
            tags={**self.settings.tags, **self.identity, "worker": self.worker_id,
                  **({"warm_start": warm} if warm else {})},
            parent_run_id=self.parent_run_id, number=trial.number, hypermodel=self.tunable,
            hyperparameters=OptunaHyperParameters(trial) if self.tunable is not None else None,
            checkpoint=self._checkpoint(claimed, retry_of), resumed_from=retry_of, time_limit=sweep.trial_timeout)

    @property
    def training(self) -> bool:
        """Whether Keras is computing the running trial (where SIGTERM may raise)."""
        return self.busy.training

    def _checkpoint(self, claimed: Claim, retry_of: int | None) -> Any:
        """Where the ``claimed`` trial keeps its checkpoint (``train``), a ``checkpoints.Slot`` owned
        by this storage, study, data and trial; a retry takes over its original's file, and its
        owner, to resume it. None for a hypermodel's trial, which trains as it was compiled."""
        from cifar_exp.training import checkpoints

        if self.tunable is not None:
            return None
        study, number, settings = claimed.study, claimed.trial.number, self.settings
        path = sidecar.checkpoint(settings.storage, self.sweep.name, number, settings.checkpoint_dir)
        writer = claimed.trial._trial_id
        if retry_of is not None:  # the checkpoint names the first of the chain as its writer
            writer = study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, recovery.first_of(study, int(retry_of)))
            original = sidecar.checkpoint(settings.storage, self.sweep.name, int(retry_of), settings.checkpoint_dir)
            if original.is_file():  # none was written (it died in its first epoch), or it is not ours
                try:
                    os.replace(original, path)
                except OSError:  # it cannot be moved: the retry starts at epoch 0
                    pass
        owner = sidecar.owner(settings.storage, self.sweep.name, study._study_id, writer, settings.data_checksum)
        return checkpoints.Slot(path, owner)


def ended_event(number: int, outcome: lifecycle.Outcome, sweep: Any) -> events.Ended:
    """The sweep command's event of a trial's ``outcome``."""
    if isinstance(outcome, lifecycle.Completed):
        return events.Ended(number, "COMPLETE", outcome.run_id, value=outcome.value,
                            test_accuracy=outcome.test_accuracy, degenerate=outcome.verdict.get("degenerate", ""),
                            infeasible=outcomes.broken(sweep.constraints, outcome.metrics))
    if isinstance(outcome, lifecycle.Pruned):
        return events.Ended(number, "PRUNED", outcome.run_id, reason=outcome.reason,
                            degenerate=outcome.verdict.get("degenerate", ""))
    if isinstance(outcome, lifecycle.Infeasible):
        return events.Ended(number, "PRUNED", outcome.run_id, reason=f"infeasible before training: {outcome.reason}")
    return events.Ended(number, "FAIL", outcome.run_id, reason=outcome.reason)


class OptunaTrial:
    """The Optuna engine's part of one trial (a ``lifecycle.Engine``): record the run on the
    trial, report each epoch (to the trial, or the companion study of a multi-objective sweep)
    and prune, tell the outcome; the sweep command hears each step as an ``events`` event."""

    def __init__(self, worker: Worker, claimed: Claim, prune: Pruning, seed: int) -> None:
        self.worker, self.study, self.trial, self.prune, self.seed = worker, claimed.study, claimed.trial, prune, seed
        self.sweep, self.queue, self.params = worker.sweep, worker.queue, claimed.params
        self.run_id = ""

    @property
    def stopping(self) -> bool:
        return self.worker.stop

    def opened(self, run_id: str) -> None:
        self.run_id = run_id
        for key, value in TrialAttrs.encode(mlflow_run_id=run_id, seed=self.seed).items():
            self.trial.set_user_attr(key, value)
        self.queue.put(events.Started(self.worker.worker_id, self.trial.number, run_id, self.params))

    def steps(self, epoch: int, step: int, steps: int) -> None:
        """Tell the sweep command how far into the epoch the trial is."""
        self.queue.put(events.Steps(self.trial.number, epoch + 1, self.sweep.epochs, step, steps))

    def epoch(self, epoch: int, logs: Mapping[str, float], replayed: bool) -> None:
        """Report, tell the sweep command, then stop or prune if due; a replayed epoch (trained by
        the original of a retry) is reported, not judged for pruning: it was, when it ran."""
        metric, epochs = self.sweep.objective.metric, self.sweep.epochs
        self.prune.report(logs[metric], epoch + 1)
        if replayed:
            for key, value in TrialAttrs.encode(resumed_epochs=epoch + 1).items():
                self.trial.set_user_attr(key, value)
        self.queue.put(events.Epoch(self.trial.number, epoch + 1, epochs, logs[metric], dict(logs)))
        if replayed:
            return
        if self.worker.stop:
            raise Interrupted()
        if epoch + 1 < epochs and self.prune.should_prune():  # a finished trial is not pruned
            raise lifecycle.Prune(f"pruned after epoch {epoch + 1}: {metric}={logs[metric]:.4f}")

    def ended(self, outcome: lifecycle.Outcome) -> Mapping[str, Any]:
        """Tell Optuna (and the companion study) the outcome, with what the trial recorded."""
        trial, study = self.trial, self.study
        if isinstance(outcome, lifecycle.Failed):
            if outcome.interrupted:  # its retry resumes from its checkpoint, in this sweep or the next
                if recovery.fail_in_study(study, trial, "interrupted (Ctrl-C or SIGTERM)", interrupted=True):
                    recovery.retry(study, trial, interrupted=True)
            else:
                self.prune.end(TrialState.FAIL)
                recovery.fail_in_study(study, trial, outcome.reason)
            return {}
        attrs, extra = self._attrs(outcome)
        for key, value in TrialAttrs.encode(**attrs).items():
            trial.set_user_attr(key, value)
        if isinstance(outcome, lifecycle.Completed):
            self.prune.end(TrialState.COMPLETE, outcome.value)
            study.tell(trial, outcome.values(self.sweep.objectives))
        else:
            self.prune.end(TrialState.PRUNED)
            study.tell(trial, state=TrialState.PRUNED)
        return extra

    def _attrs(self, outcome: lifecycle.Completed | lifecycle.Pruned | lifecycle.Infeasible
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The trial's user attributes for ``outcome`` (its constraints set on the way), and the
        tags its run ends with beyond the outcome's."""
        constraints = self.sweep.constraints
        if isinstance(outcome, lifecycle.Infeasible):
            for name, excess in outcomes.constraint_values(constraints, outcome.metrics).items():
                self.trial.set_constraint(name, excess)
            return {"infeasible": outcome.reason, "epochs_run": 0,
                    "param_count": int(outcome.metrics["param_count"])}, {}
        if isinstance(outcome, lifecycle.Pruned):
            return {"epochs_run": outcome.epochs_run, "phases": outcome.phases, "compiled": outcome.compiled,
                    **outcome.verdict}, {}
        measured = outcome.metrics
        broken = outcomes.broken(constraints, measured)
        for name, excess in outcomes.constraint_values(constraints, measured).items():
            self.trial.set_constraint(name, excess)
        return {"test_loss": outcome.test_loss, "test_accuracy": outcome.test_accuracy,
                "epochs_run": outcome.epochs_run, "model_uri": outcome.model_uri, "model_epoch": outcome.model_epoch,
                "phases": outcome.phases, "compiled": outcome.compiled, "param_count": int(measured["param_count"]),
                **{k: measured[k] for k in SPEED_METRICS if k in measured},
                **({"infeasible": broken} if broken else {}), **outcome.verdict}, \
            ({"infeasible": broken} if broken else {})
