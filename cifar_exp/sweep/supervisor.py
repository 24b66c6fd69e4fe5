"""The sweep command's side of a sweep (the supervisor): an Optuna study whose trials run in
worker processes and are tracked in MLflow.

``run_sweep`` creates or resumes the study (``storage``) and the MLflow parent run, then starts
``workers`` spawned processes (``worker``). The parent never imports Keras; it follows the
workers through a queue of ``events`` (progress, best so far), replaces a worker whose trial
failed (a fresh process), records a trial whose worker died as failed in both systems and
retries it once, stops the workers on Ctrl-C, SIGTERM, the timeout or too many failures in a
row, and keeps the study's report (``overview``) in the parent run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from cifar_exp import lifecycle, report, track
from cifar_exp.config import Settings, Sweep, UserError, outcomes
from cifar_exp.config.records import StudyAttrs, TrialAttrs
from cifar_exp.sweep import events, liveness, recovery, sidecar, storage, warmstart, worker

STOP_GRACE_SECONDS = 60.0  # how long interrupted workers get to record their trials
# Rebuilding the report (every plot of every trial) took 3.7 s for a 12-trial study on this 2-core
# machine, CPU taken from the workers: at most once a minute while trials finish (the first a
# minute after the start, not after the first trial), and at the end.
REPORT_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class Summary:
    study_name: str
    experiment_id: str
    parent_run_id: str
    counts: dict[str, int]
    best: list[FrozenTrial]  # best first, complete feasible trials only (``storage.best_trials``)
    interrupted: bool
    stop_reason: str = ""
    front: list[FrozenTrial] = field(default_factory=list)  # the Pareto front (the best, with one objective)
    untrained: int = 0  # trials a constraint known before training kept from training


def tally(study: optuna.Study, sweep: Sweep) -> events.Tally:
    """The counts of the study's trials so far, where a run of the sweep starts counting."""
    trials = study.get_trials(deepcopy=False)
    top = storage.best_trials(study, sweep.objectives, 1)
    return events.Tally(maximize=sweep.objective.direction == "maximize",
                        finished=len(storage.counted(trials)),
                        states={s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
                        best=(float(top[0].values[0]), top[0].number) if top else None,
                        infeasible=sum(t.state.name == "COMPLETE" and not outcomes.feasible(t) for t in trials))


OnEvent = Callable[[events.Event, events.Tally], None]


def run_sweep(settings: Settings, on_event: OnEvent = lambda event, tally: None) -> Summary:
    """Run (or resume) the sweep until its budget, its timeout, an interruption, or too many
    consecutive failures. ``on_event`` receives every worker event with the counts after it (for
    a progress display)."""
    sweep = settings.sweep
    study = storage.create_study(settings)
    track.configure(settings.tracking_uri)
    experiment = track.experiment_id(sweep.name)
    parent = start_parent_run(settings, study, experiment)
    with storage.budget_lock(settings.storage, study, sweep.name):  # left RUNNING by a killed run
        stale = recovery.recover_stale(study, storage.locks(settings.storage), settings.storage, sweep.heartbeat_grace)
        warmed = warmstart.seed(study, sweep)
    close_orphans(study, experiment, parent)
    close_confirmations(settings.storage, study, sweep.name)
    state = _Parent(settings, study, parent, on_event)
    for trial in stale:
        on_event(events.Stale(trial.number, TrialAttrs.of(trial).fail_reason or ""), state.tally)
    for line in warmed:
        on_event(events.Warmed(line), state.tally)
    try:
        state.supervise(experiment)
    finally:
        state.close()
    if state.fatal:  # nothing trained: the parent run records why, the CLI exits with code 2
        track.end_run(parent, "FAILED", {"fail_reason": state.fatal})
        raise UserError(state.fatal)
    trials = study.get_trials(deepcopy=False)
    liveness.clear_dead(settings.storage)  # the files of workers killed during this run (or before)
    # Checkpoints a dead worker left for a retry that will not come (the sweep is over, or the
    # retry died too); those of trials still running, or of a retry still queued, stay.
    sidecar.drop_checkpoints(settings.storage, sweep.name, {t.number for t in trials if t.state == TrialState.RUNNING}
                             | {int(a.retry_of) for t in trials if t.state == TrialState.WAITING
                                and (a := TrialAttrs.of(t)).retry_of is not None}, settings.checkpoint_dir)
    best = storage.best_trials(study, sweep.objectives, 5)
    _finish_parent(study, parent, trials, best, sweep, interrupted=state.interrupted)
    counts = {s.name: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                  TrialState.FAIL, TrialState.RUNNING)}
    untrained = sum(1 for t in trials if (a := TrialAttrs.of(t)).infeasible and a.epochs_run == 0)
    return Summary(sweep.name, experiment, parent, counts, best, state.interrupted, state.stop_reason,
                   outcomes.front(trials, sweep.objectives), untrained)  # type: ignore[arg-type]


def start_parent_run(settings: Settings, study: optuna.Study, experiment: str) -> str:
    """The study's MLflow parent run: started once, resumed by every later run of the sweep."""
    sweep = settings.sweep
    with storage.budget_lock(settings.storage, study, sweep.name):  # one parent run, however many hosts
        parent = track.start_parent(
            experiment, storage.existing_attrs(settings).mlflow_parent_run_id, f"{sweep.name}-study",
            {**settings.tags, "sweep": sweep.name, "sweep_file": str(sweep.path),
             "sweep_sha256": sweep.content_hash, "objective": f"{sweep.objective.direction} {sweep.objective.metric}",
             "sampler": f"{sweep.sampler.name} seed={sweep.sampler.seed}", "pruner": sweep.pruner.name,
             "epochs": str(sweep.epochs), "budget_trials": str(sweep.trials), "optuna_study": sweep.name,
             "optuna_storage": settings.storage, "deterministic": str(sweep.deterministic).lower(),
             "engine": "optuna"})
        for key, value in StudyAttrs.encode(mlflow_parent_run_id=parent).items():
            study.set_user_attr(key, value)
    for key, value in StudyAttrs.encode(mlflow_experiment_id=experiment).items():
        study.set_user_attr(key, value)
    track.view.share_trials_view(experiment, [(o.metric, o.direction) for o in sweep.objectives], list(sweep.space))
    return parent


def close_orphans(study: optuna.Study, experiment: str, parent: str) -> list[str]:
    """End the trial runs still RUNNING in MLflow whose trial is not running in the study: a trial
    ended in Optuna while its run could not be closed (a full disk, a tracking server down). Each
    ends as its trial did (FAILED with the trial's reason, or KILLED; a sound complete trial's model
    tagged registrable); returns their ids."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = []
    for run_id, number in track.running_children(experiment, parent).items():
        if number in running:
            continue
        trial = by_number.get(number)
        if trial is not None and trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            attrs = TrialAttrs.of(trial)  # a sound complete trial's model is registrable, as its worker would tag it
            lifecycle.end(run_id, lifecycle.Closed(run_id, trial.state.name, model_uri=attrs.model_uri or ""),
                          trial=number, registrable=not attrs.degenerate and outcomes.feasible(trial))
        else:
            reason = (TrialAttrs.of(trial).fail_reason if trial else None) or \
                "the sweep stopped before this trial's run was closed"
            lifecycle.end(run_id, lifecycle.Closed(run_id, "FAIL", reason,
                                                   interrupted=trial is None or bool(TrialAttrs.of(trial).interrupted)),
                          trial=number)
        closed.append(run_id)
    return closed


def close_confirmations(url: str, study: optuna.Study, name: str) -> list[str]:
    """End as KILLED the confirmation runs (``register --seeds``) under the study's parent run
    still RUNNING whose register is gone; returns their ids. When no register holds the study's
    models lock (``storage.models_lock``, on every host that shares the storage), every RUNNING
    one is; while one does, only those of a dead process on this host."""
    attrs = StudyAttrs.of(study)
    parent, experiment = attrs.mlflow_parent_run_id, attrs.mlflow_experiment_id
    if not parent or not experiment:
        return []
    closed = []
    with storage.models_lock(url, study, name, shared=False, wait=False) as held:
        none_registering = held and storage.locks(url)  # a database without the lock cannot tell
        here = liveness.machine()
        for run_id, tags in track.running_confirmations(str(experiment), str(parent)).items():
            if none_registering or (tags.get("confirmation_host") == here and not liveness.alive(
                    tags.get("confirmation_pid"), tags.get("confirmation_started"))):
                lifecycle.end(run_id, lifecycle.Failed(run_id, "its register --seeds process ended before it did",
                                                       interrupted=True))
                closed.append(run_id)
    return closed


class _Parent:
    """The sweep command while its workers run: the workers, the counts (``events.Tally``), and
    why it stops (an interruption, too many failures in a row, a fatal worker)."""

    def __init__(self, settings: Settings, study: optuna.Study, parent_run_id: str,
                 on_event: OnEvent) -> None:
        self.settings, self.sweep, self.study = settings, settings.sweep, study
        self.parent_run_id = parent_run_id
        self.on_event = on_event
        self.tally = tally(study, settings.sweep)
        self.pids: set[int] = set()  # every worker this run started
        self.workers: dict[int, mp.process.BaseProcess] = {}
        self.interrupted = False
        self.stop_reason = ""
        self.fatal = ""  # a worker found the sweep cannot run at all (e.g. weights unavailable)
        self.published = time.time()
        self.ctx = mp.get_context("spawn")  # fork after importing TensorFlow/JAX threads is unsafe
        self.stop = self.ctx.Event()
        self.queue: Any = self.ctx.Queue()
        self.deadline = time.time() + self.sweep.timeout if self.sweep.timeout else None
        self.previous: dict[int, Any] = {}
        self.silenced: dict[int, float] = {}  # pid -> seconds of silence, of the workers killed as frozen

    def supervise(self, experiment: str) -> None:
        """Start the workers the budget needs, then follow them until every one has ended."""
        self.previous = {s: signal.signal(s, self._on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        trials = self.study.get_trials(deepcopy=False)
        if storage.budget_state(self.sweep, trials) != "done":
            workers = self.settings.workers
            left = self.sweep.trials - len(storage.counted(trials)) if self.sweep.trials is not None else workers
            for worker_id in range(max(1, min(workers, left))):
                self._start(worker_id, experiment)
        stop_sent = 0.0
        ticked = time.monotonic()
        while self.workers:
            if time.monotonic() - ticked >= 1.0:  # a live display moves between events
                ticked = time.monotonic()
                self.on_event(events.Tick(), self.tally)
            try:
                self.handle(self.queue.get(timeout=0.2))
                continue
            except queue.Empty:
                pass
            if (self.interrupted or self.stop_reason or self.fatal) and not stop_sent:
                self._stop_workers()
                stop_sent = time.time()
            if stop_sent and time.time() - stop_sent > STOP_GRACE_SECONDS:
                for process in self.workers.values():
                    process.kill()
            self._kill_frozen()
            self._reap(experiment)
        self._drain()

    def _start(self, worker_id: int, experiment: str) -> None:
        process = self.ctx.Process(target=worker.main, name=f"cifar_exp-worker-{worker_id}", daemon=True,
                                   args=(self.settings, experiment, self.parent_run_id, self.stop, self.queue,
                                         worker_id, self.deadline, os.getpid()))
        process.start()
        assert process.pid is not None
        self.pids.add(process.pid)
        self.workers[worker_id] = process

    def _kill_frozen(self) -> None:
        """SIGKILL the workers whose heartbeat is silent past the sweep's ``heartbeat_grace``
        (``liveness``); ``_reap`` then fails and retries their trials like any dead worker's."""
        for process in self.workers.values():
            if process.pid is None or process.pid in self.silenced or not process.is_alive():
                continue
            try:
                started = psutil.Process(process.pid).create_time()
            except psutil.Error:  # it just ended: _reap's
                continue
            silent = liveness.frozen(self.settings.storage, process.pid, started, self.sweep.heartbeat_grace)
            if silent is not None:
                self.silenced[process.pid] = silent

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.interrupted = True

    def _stop_workers(self) -> None:
        self.stop.set()
        if self.interrupted:
            for process in self.workers.values():
                if process.pid and process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)

    def _reap(self, experiment: str) -> None:
        """Workers that ended: a dead one's trial is failed (and retried); any that did not end
        cleanly is replaced while the budget is open and nothing stops the sweep."""
        for worker_id, process in list(self.workers.items()):
            if process.is_alive():
                continue
            process.join()
            self._drain()
            del self.workers[worker_id]
            if process.exitcode not in (0, worker.EXIT_TRIAL_FAILED):
                self.worker_died(process.pid, process.exitcode)  # type: ignore[arg-type]
            if process.exitcode != 0 and not self.stop.is_set() and \
                    storage.budget_state(self.sweep, self.study.get_trials(deepcopy=False)) != "done":
                self._start(worker_id, experiment)
            streak = self.tally.failures_in_a_row
            if streak >= self.sweep.max_consecutive_failures and not self.stop_reason:
                self.stop_reason = (f"stopped after {streak} consecutive failed trials "
                                    f"(max_consecutive_failures); see fail_reason on the failed runs")

    def _drain(self) -> None:
        while True:
            try:
                self.handle(self.queue.get(timeout=0.05))
            except queue.Empty:
                return

    def handle(self, event: events.Event) -> None:
        if isinstance(event, events.Fatal):
            self.fatal = self.fatal or event.reason
        if isinstance(event, events.Ended):
            if self.tally.add(event) and event.value is not None:
                track.log_metrics(self.parent_run_id, {f"best_{self.sweep.objective.metric}": event.value},
                                  step=event.trial)
            if time.time() - self.published > REPORT_EVERY_SECONDS:
                _publish_quietly(self.study, self.parent_run_id, self.sweep)  # at most once a minute
                self.published = time.time()
        self.on_event(event, self.tally)

    def worker_died(self, pid: int, exitcode: int | None) -> None:
        """A worker ended abnormally (crash, SIGKILL, OOM kill): fail its trial in both systems, and
        retry it once (with the same parameters) unless the sweep is stopping."""
        trials = recovery.running(self.study, {pid})
        if not trials:  # it died between trials: still a failure in a row
            self.tally.failures_in_a_row += 1
        for trial in trials:
            reason = f"worker process died (exit code {exitcode})"
            if pid in self.silenced:
                reason = f"worker process frozen: no heartbeat for {self.silenced[pid]:.0f} s, killed"
            if self.interrupted:
                reason = "interrupted: the worker was stopped before the trial ended"
            if not recovery.fail_trial(self.study, trial, reason, "KILLED" if self.interrupted else "FAILED",
                                      interrupted=self.interrupted):
                continue  # a worker found it stale first, and retried it
            retried = recovery.retry(self.study, trial, self.interrupted)
            ended = events.Ended(trial.number, "FAIL", TrialAttrs.of(trial).mlflow_run_id or "", retried=retried,
                                 reason=events.INTERRUPTED if self.interrupted else reason)
            if ended.reason == events.INTERRUPTED:
                self.tally.failures_in_a_row += 1  # counted as a failure, as a death: the streak still grows
            self.handle(ended)

    def close(self) -> None:
        """Restore the signal handlers, kill workers still alive, and end as interrupted the trials
        of this run's workers still RUNNING."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        for process in self.workers.values():
            process.kill()
        for trial in recovery.running(self.study, self.pids):
            if recovery.fail_trial(self.study, trial, "interrupted: the sweep stopped before this trial ended",
                                   "KILLED", interrupted=True):
                recovery.retry(self.study, trial, interrupted=True)  # it resumes from its checkpoint
        self.queue.close()


def publish(study: optuna.Study, parent: str, sweep: Sweep) -> dict[str, str]:
    """(Re)build the study's report (plots, trials table, cost ledger; see ``overview``) into its
    MLflow parent run, with the ledger's seconds as parent metrics. Returns the plots not drawn
    yet, with why."""
    with tempfile.TemporaryDirectory() as tmp:
        skipped = report.write(study, Path(tmp), sweep.epochs, sweep.objectives)
        track.log_dir(parent, Path(tmp))
        cost = json.loads((Path(tmp) / "cost.json").read_text())
    track.log_metrics(parent, {f"cost_{k}": float(v) for k, v in cost.items()}, step=len(study.trials))
    return skipped


def _publish_quietly(study: optuna.Study, parent: str, sweep: Sweep) -> None:
    try:
        publish(study, parent, sweep)
    except Exception as exc:  # noqa: BLE001 (a report is never worth a crashed sweep; the next rebuild retries)
        # A line for the library log, not the terminal: on a full disk the sweep's error is the
        # one line a user reads (the report's failure said it a second time).
        logging.getLogger("cifar_exp").warning("could not update the study report: %s: %s", type(exc).__name__, exc)


def _finish_parent(study: optuna.Study, parent: str, trials: Sequence[FrozenTrial], best: list[FrozenTrial],
                   sweep: Sweep, interrupted: bool) -> None:
    tags: dict[str, Any] = {"trials_finished": len(storage.counted(trials))}
    if best:
        top = best[0]
        tags.update({"best_trial": top.number, "best_run_id": TrialAttrs.of(top).mlflow_run_id or "",
                     **{f"best.{k}": v for k, v in top.params.items()}})
        metrics = {f"best_{o.metric}": v for o, v in zip(sweep.objectives, top.values, strict=True)}
        metrics.update({f"best_{k}": v for k, v in TrialAttrs.of(top).test_metrics().items()})
        track.log_metrics(parent, metrics, step=top.number)
    _publish_quietly(study, parent, sweep)
    track.end_run(parent, "KILLED" if interrupted else "FINISHED", tags)
