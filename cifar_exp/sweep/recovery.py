"""Stale trials and failing a trial.

Stale trials. A trial whose worker is gone (SIGKILL, power cut) stays RUNNING in storage. Each
trial carries its worker's host, pid and process start time; on PostgreSQL (and any RDB) it also
records a heartbeat every ``sweep.storage.HEARTBEAT_SECONDS``. Before claiming
(``sweep.storage.claim``, under the budget lock), every process fails the RUNNING trials whose
worker is gone (same host: the process no longer exists, or its heartbeat file is silent past
``heartbeat_grace``; any host: no heartbeat for ``sweep.storage.GRACE_SECONDS``), closes their
MLflow runs as KILLED and enqueues each once more with the same parameters.

Failing a trial. Every failure path (a raising trial, an interruption, a dead or stale worker)
ends in ``fail_trial``, which fails the trial in Optuna and closes its MLflow run. MLflow is
imported only when a run is closed, so a process that claims trials and finds none stale
imports Optuna alone.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from optuna.trial import FrozenTrial, TrialState

from cifar_exp.config.records import StudyAttrs, TrialAttrs
from cifar_exp.sweep import liveness


def recover_stale(study: optuna.Study, unclaimed: bool = False, url: str = "",
                  grace: float = float("inf")) -> list[FrozenTrial]:
    """Fail the study's RUNNING trials whose worker is gone, close their MLflow runs as KILLED, and
    enqueue each once more (a trial that is itself a retry is not retried again). Returns them.

    Gone: on this host, a worker process that no longer exists, or whose heartbeat file (see
    ``liveness``, beside the storage ``url``) is silent past ``grace`` (it is killed); on an RDB storage, also a trial
    of any host without a heartbeat for the storage's grace period; with ``unclaimed`` (the
    caller holds the budget lock, under which every claim stamps its trial), also a trial with no
    worker stamped on it: its claimer died, or met a full disk, between asking and stamping.
    Safe to run in many processes at once: only the one whose state change wins closes and
    retries a trial."""
    host = liveness.machine()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    attrs = {t.number: TrialAttrs.of(t) for t in running}
    gone = [(t, f"stale: its worker (pid {attrs[t.number].worker_pid}) is gone") for t in running
            if attrs[t.number].worker_host == host
            and not liveness.alive(attrs[t.number].worker_pid, attrs[t.number].worker_started)]
    if unclaimed:
        gone += [(t, "stale: its claim never finished (no worker was recorded on it)") for t in running
                 if attrs[t.number].worker_host is None]
    for t in running:
        pid, started = attrs[t.number].worker_pid, attrs[t.number].worker_started
        if attrs[t.number].worker_host == host and pid is not None and started is not None \
                and liveness.alive(pid, started):
            silent = liveness.frozen(url, pid, started, grace)
            if silent is not None:
                gone.append((t, f"stale: its worker (pid {pid}) was silent for {silent:.0f} s "
                                f"(frozen): killed"))
    rdb = beating(study._storage)
    if rdb is not None:
        grace = rdb.grace_period or 2 * (rdb.heartbeat_interval or 0)
        gone += [(study._storage.get_trial(trial_id), f"stale: no heartbeat for {grace} s (its worker is gone)")
                 for trial_id in rdb._get_stale_trial_ids(study._study_id)]
    stale = [trial for trial, reason in gone if fail_trial(study, trial, reason, "KILLED")]
    for trial in stale:
        retry(study, trial)
    return stale


def retry(study: optuna.Study, trial: optuna.Trial | FrozenTrial, interrupted: bool = False) -> bool:
    """Enqueue a retry of the ended ``trial`` (its params, ``retry_of`` its number: it resumes from
    the trial's checkpoint and trains with the seed of the first of its chain); whether one was
    enqueued. After an interruption always (Ctrl-C, a scheduler's SIGTERM, a preemption: the
    trial did nothing wrong, and may be stopped again); after a failure or a death once (a retry
    that fails too is not retried: a trial that kills its worker would kill every worker)."""
    if not interrupted and TrialAttrs.of(trial).retry_of is not None:
        return False
    study.enqueue_trial(trial.params, user_attrs=TrialAttrs.encode(retry_of=trial.number))
    return True


def first_of(study: optuna.Study, number: int) -> int:
    """The trial a chain of retries began with: ``number``, or what it is a retry of, and so on."""
    trials = study.get_trials(deepcopy=False)
    seen = {number}
    while (up := TrialAttrs.of(trials[number]).retry_of) is not None and int(up) not in seen:
        number = int(up)
        seen.add(number)
    return number


def beating(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    """The RDB storage behind ``storage`` if it has heartbeats on (a Study wraps it in a cache)."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) and backend.heartbeat_interval else None


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial | FrozenTrial) -> Iterator[None]:
    """While the block runs, record ``trial``'s heartbeat every interval (RDB storages with
    heartbeats on; a no-op otherwise), from a thread, so a long epoch does not look like death."""
    trial_id = trial._trial_id
    rdb = beating(storage)
    if rdb is None:
        yield
        return
    interval = rdb.heartbeat_interval
    done = threading.Event()

    def beat() -> None:
        while True:
            try:
                rdb.record_heartbeat(trial_id)
            except Exception as exc:  # noqa: BLE001 (the database blinked: the next beat retries, well within grace)
                print(f"cifar_exp: heartbeat of trial {trial_id} failed: {exc}", file=sys.stderr)
            if done.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def fail_trial(study: optuna.Study, trial: optuna.Trial | FrozenTrial, reason: str, run_status: str = "FAILED",
               interrupted: bool = False) -> bool:
    """Fail ``trial`` in both systems: in the study (``fail_in_study``), and its MLflow run ended
    with ``run_status`` (FAILED, or KILLED for an interruption or a dead worker; see
    ``close_run``). False, and nothing done, if another process already ended the trial (a worker
    that found it stale closes it itself). For a trial whose own run is not being conducted: a
    dead or stale worker's, one the sweep stopped (a running trial's run is ended by
    ``lifecycle.run_trial``)."""
    if not fail_in_study(study, trial, reason, interrupted):
        return False
    try:
        close_run(study, study._storage.get_trial(trial._trial_id), run_status, reason)
    except Exception as exc:  # noqa: BLE001 (tracking down: the Optuna record above already holds the reason)
        print(f"cifar_exp: could not close the MLflow run of trial {trial.number}: {exc}", file=sys.stderr)
    return True


def fail_in_study(study: optuna.Study, trial: optuna.Trial | FrozenTrial, reason: str,
                  interrupted: bool = False) -> bool:
    """Fail ``trial`` in the study with its ``fail_reason`` (and ``interrupted``, which keeps it
    out of the budget); False, and nothing done, if another process already ended it."""
    storage = study._storage
    trial_id = trial._trial_id
    try:
        flags = {"interrupted": True} if interrupted else {}
        for key, value in TrialAttrs.encode(fail_reason=reason, **flags).items():
            storage.set_trial_user_attr(trial_id, key, value)
        return bool(storage.set_trial_state_values(trial_id, TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def close_run(study: optuna.Study, trial: FrozenTrial, status: str, reason: str) -> None:
    """End the MLflow run of a failed ``trial`` with ``status`` and ``reason``. A trial whose worker
    died before it created the run gets one now (its params, tagged ``state=FAIL`` and
    ``trial_number`` under the parent run), so every trial of the study has exactly one run;
    without the study's experiment (nothing tracked yet) there is nowhere to put it. (Optuna
    takes no attribute on a finished trial, so such a trial's ``mlflow_run_id`` stays unset.)"""
    from cifar_exp import lifecycle, track  # MLflow (2 s to import) only where a run is closed

    run_id = TrialAttrs.of(trial).mlflow_run_id
    if not run_id:
        attrs = StudyAttrs.of(study)
        if attrs.mlflow_experiment_id is None or attrs.mlflow_parent_run_id is None:
            return
        run_id = track.start_trial_run(attrs.mlflow_experiment_id, attrs.mlflow_parent_run_id, trial.number,
                                       params=dict(trial.params), tags={"sweep": study.study_name,
                                                                        "engine": "optuna"})
    lifecycle.end(run_id, lifecycle.Failed(run_id, reason, interrupted=status == "KILLED"), trial=trial.number)


def running(study: optuna.Study, pids: set[int]) -> list[FrozenTrial]:
    """The study's RUNNING trials whose worker is one of ``pids`` (on any host)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if TrialAttrs.of(t).worker_pid in pids]
