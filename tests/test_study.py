"""The study's budget and stale-trial recovery on real storages (a journal file, SQLite through
Optuna's RDB storage) and a real MLflow SQLite store; no training."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cifar_exp import track
from cifar_exp.config.sweepfile import load_sweep
from cifar_exp.sweep import recovery
from cifar_exp.sweep.recovery import recover_stale
from cifar_exp.sweep.storage import (
    Claim,
    Settings,
    budget_state,
    claim,
    counted,
    create_study,
    open_storage,
)


def settings(storage: str, trials: int | None = 3) -> Settings:
    return Settings(sweep=dataclasses.replace(load_sweep("lr_dropout"), trials=trials), storage=storage,
                    tracking_uri="unused")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_counted_leaves_out_interrupted_and_retried_failures() -> None:
    s = optuna.create_study()
    for state, attrs in [(TrialState.COMPLETE, {}), (TrialState.FAIL, {"interrupted": True}),
                         (TrialState.FAIL, {}), (TrialState.COMPLETE, {"retry_of": 2}), (TrialState.PRUNED, {}),
                         (TrialState.FAIL, {})]:
        s.add_trial(optuna.create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                                        intermediate_values={1: 0.1} if state == TrialState.PRUNED else None,
                                        user_attrs=attrs))
    assert [t.number for t in counted(s.get_trials())] == [0, 3, 4, 5]


def test_budget_state_open_wait_done() -> None:
    sweep = dataclasses.replace(load_sweep("lr_dropout"), trials=2)
    s = optuna.create_study()
    s.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.5))
    assert budget_state(sweep, s.get_trials()) == "open"
    running = s.ask()
    assert budget_state(sweep, s.get_trials()) == "wait"  # it may fail and be retried
    s.tell(running, 0.6)
    assert budget_state(sweep, s.get_trials()) == "done"
    assert budget_state(dataclasses.replace(sweep, trials=None), s.get_trials()) == "open"


def test_a_trial_whose_worker_is_gone_is_failed_closed_and_retried_once(isolated: Path) -> None:
    track.configure(f"sqlite:///{isolated}/mlruns/mlflow.db")
    own = settings(str(isolated / "o.journal"))
    create_study(own)
    claimed = claim(own, open_storage(own.storage))
    assert isinstance(claimed, Claim)
    study, trial, params = claimed.study, claimed.trial, claimed.params
    run_id = track.start_run(track.experiment_id("lr_dropout"), "trial-0", params, {})
    trial.set_user_attr("mlflow_run_id", run_id)
    assert recover_stale(study) == []  # its worker (this process) lives
    trial.set_user_attr("worker_pid", dead_pid())
    (stale,) = recover_stale(study)
    assert stale.number == 0 and recover_stale(study) == []  # once
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and "is gone" in first.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.user_attrs == {"retry_of": 0}
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and "is gone" in run.data.tags["fail_reason"]
    # the retry runs with the same parameters, and counts instead of the stale trial
    claimed = claim(own, open_storage(own.storage))
    assert isinstance(claimed, Claim) and claimed.trial.number == 1 and claimed.params == params
    claimed.study.tell(claimed.trial, 0.5)
    assert [t.number for t in counted(study.get_trials())] == [1]
    # a retry that goes stale in its turn is failed, not retried again
    claimed = claim(own, open_storage(own.storage))
    assert isinstance(claimed, Claim)
    claimed.trial.set_user_attr("worker_pid", dead_pid())
    recover_stale(study)
    assert [t.state for t in study.get_trials()][-2:] == [TrialState.FAIL, TrialState.WAITING]
    retry_of_retry = study.get_trials()[-1]
    claimed = claim(own, open_storage(own.storage))
    assert isinstance(claimed, Claim) and claimed.trial.number == retry_of_retry.number
    claimed.trial.set_user_attr("worker_pid", dead_pid())
    recover_stale(study)
    assert study.get_trials()[-1].state == TrialState.FAIL  # no further retry


def _heartbeat(db: Path, move: int = 0) -> str:
    """The recorded heartbeat, after moving it ``move`` seconds into the past (the storage's clock
    is the database's ``now()``)."""
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as connection, connection:
        if move:
            connection.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?)", (f"-{move} seconds",))
        row = connection.execute("SELECT heartbeat FROM trial_heartbeats").fetchone()
        return "" if row is None else str(row[0])


def test_a_trial_of_another_host_is_stale_once_its_heartbeat_stops(isolated: Path) -> None:
    # Time is the database's: the test moves the recorded beat an hour back instead of sleeping
    # past the grace, so no verdict depends on how promptly a thread was scheduled.
    url = f"sqlite:///{isolated}/o.db"
    own = settings(url)
    create_study(own)
    storage = open_storage(url, heartbeat=1, grace=60)
    claimed = claim(own, storage)
    assert isinstance(claimed, Claim)
    study, trial = claimed.study, claimed.trial
    trial.set_user_attr("worker_host", "another-host.example")  # its pid means nothing here
    deadline = time.monotonic() + 120
    with recovery.heartbeat(storage, trial):
        while not _heartbeat(isolated / "o.db"):  # its first beat
            assert time.monotonic() < deadline, "the heartbeat thread never beat"
            time.sleep(0.1)
        aged = _heartbeat(isolated / "o.db", move=3600)
        while _heartbeat(isolated / "o.db") == aged:  # the thread beats again, unprompted
            assert time.monotonic() < deadline, "the heartbeat thread never beat again"
            time.sleep(0.1)
        assert recover_stale(study) == []  # beating
    _heartbeat(isolated / "o.db", move=3600)  # the block ended (its thread joined): silent for an hour
    (stale,) = recover_stale(study)
    assert stale.number == trial.number
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and "no heartbeat for 60 s" in failed.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == trial.number
    assert socket.gethostname() != "another-host.example"


def test_a_worker_of_another_pid_namespace_under_the_same_host_name_is_never_judged_by_its_pid(
        isolated: Path) -> None:
    """Two containers with host networking (or two pods of one hostname) share a host name, not
    their pids: a trial claimed in the other one, whose pid is dead here, is left to the storage's
    heartbeats; the same dead pid claimed on this very machine is a dead worker."""
    from cifar_exp.sweep import liveness

    own = settings(str(isolated / "o.journal"))
    create_study(own)
    here = liveness.machine()
    assert here.split("~")[0] == socket.gethostname() and len(here.split("~")) == 3  # Linux: boot and namespace
    claimed = claim(own, open_storage(own.storage))
    assert isinstance(claimed, Claim) and claimed.trial.user_attrs["worker_host"] == here
    claimed.trial.set_user_attr("worker_pid", dead_pid())
    claimed.trial.set_user_attr("worker_host", f"{socket.gethostname()}~{here.split('~')[1]}~1")  # another pidns
    assert recover_stale(claimed.study) == []
    assert claimed.study.get_trials()[0].state == TrialState.RUNNING
    claimed.trial.set_user_attr("worker_host", here)  # the same dead pid, claimed on this machine
    (stale,) = recover_stale(claimed.study)
    assert stale.number == claimed.trial.number and "is gone" in claimed.study.get_trials()[0].user_attrs["fail_reason"]


def test_a_trial_whose_worker_died_before_its_run_existed_gets_one_run_recording_the_failure(isolated: Path) -> None:
    track.configure(f"sqlite:///{isolated}/mlruns/mlflow.db")
    own = settings(str(isolated / "o.journal"))
    study = create_study(own)
    experiment = track.experiment_id("lr_dropout")
    parent = track.start_run(experiment, "lr_dropout-study", {}, {})
    study.set_user_attr("mlflow_experiment_id", experiment)
    study.set_user_attr("mlflow_parent_run_id", parent)
    claimed = claim(own, open_storage(own.storage))
    assert isinstance(claimed, Claim)
    study, trial, params = claimed.study, claimed.trial, claimed.params
    trial.set_user_attr("worker_pid", dead_pid())  # died between its claim and its run
    assert "mlflow_run_id" not in trial.user_attrs
    (stale,) = recover_stale(study)
    assert recover_stale(study) == []  # once
    (run,) = MlflowClient().search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert run.info.status == "KILLED" and "is gone" in run.data.tags["fail_reason"]
    assert run.data.tags["trial_number"] == "0" and run.data.tags["state"] == "FAIL"
    assert run.data.params == {k: str(v) for k, v in params.items()}


def test_a_time_limit_raises_at_once_while_training_and_at_the_next_check_elsewhere() -> None:
    from cifar_exp.lifecycle import TimeLimit, TrialTimeout

    training = True
    with pytest.raises(TrialTimeout, match=r"^ran past trial_timeout \(0.2 s\)$"):
        with TimeLimit(0.2, lambda: training):
            while True:  # Keras computing: the alarm raises in it
                sum(range(1000))
    training = False
    with TimeLimit(0.2, lambda: training) as limit:
        while not limit.expired:  # a storage write: the alarm only marks it
            time.sleep(0.01)
        with pytest.raises(TrialTimeout):
            limit.check()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # disarmed on the way out
    with TimeLimit(None, lambda: True) as unlimited:
        unlimited.check()
    assert unlimited.reason == ""


def test_the_heartbeat_files_of_dead_workers_are_cleared_and_the_living_kept(tmp_path: Path) -> None:
    import psutil

    from cifar_exp.sweep import liveness

    storage = str(tmp_path / "optuna.journal")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time()  # read while it may still run; then reaped
    dead.wait()
    me = psutil.Process(os.getpid())
    for pid, when in ((dead.pid, started), (me.pid, me.create_time())):
        beat = liveness.path(storage, pid, when)
        beat.parent.mkdir(parents=True, exist_ok=True)
        beat.touch()
    other_host = liveness.folder(storage) / "elsewhere-1-2.00"
    other_host.touch()
    assert liveness.clear_dead(storage) == [liveness.path(storage, dead.pid, started)]
    assert sorted(p.name for p in liveness.folder(storage).iterdir()) == sorted(
        [liveness.path(storage, me.pid, me.create_time()).name, other_host.name])
