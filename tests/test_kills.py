"""A sweep stopped the hard ways, in real processes: a worker killed mid-epoch, the whole sweep
killed, Ctrl-C, the sweep command killed alone. Every budget still finishes, nothing is counted
twice, and no process outlives its sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cifar_exp.sweep import sidecar
from tests.test_sweep import FINISHED, clean_env, run_sweep, runs, study

pytestmark = pytest.mark.slow


def wait_for_first_epoch(cwd: Path, process: subprocess.Popen, trial: int = 0,
                         name: str = "lr_dropout") -> optuna.trial.FrozenTrial:
    """Wait until ``trial`` has reported an epoch (its worker is then mid-training): the trial."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        journal = cwd / "mlruns" / "optuna.journal"
        if journal.exists():
            try:
                found = [t for t in study(cwd, name).get_trials() if t.number == trial and t.intermediate_values]
            except KeyError:  # the study is not created yet
                found = []
            if found:
                return found[0]
        time.sleep(0.2)
    raise AssertionError(f"trial {trial} never reported an epoch; sweep exit code {process.poll()}")


def test_sigkill_of_a_worker_mid_epoch_fails_its_trial_and_retries_it(isolated: Path, cifar_slice: Path) -> None:
    args = [sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "2", "--epochs", "4",
            "--data", str(cifar_slice)]
    process = subprocess.Popen(args, cwd=isolated, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=clean_env(), umask=0)  # files must not be world-writable even so
    trial = wait_for_first_epoch(isolated, process)
    checkpoint = sidecar.checkpoint(str(isolated / "mlruns" / "optuna.journal"), "lr_dropout", 0)
    while not checkpoint.exists() and process.poll() is None:  # written after the epoch's report
        time.sleep(0.05)
    os.kill(trial.user_attrs["worker_pid"], signal.SIGKILL)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "trial 0 FAIL: worker process died (exit code -9)" in out
    trials = study(isolated).get_trials()
    assert trials[0].state == TrialState.FAIL and [t.state in FINISHED for t in trials[1:]] == [True, True]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    assert trials[1].user_attrs["seed"] == trials[0].user_attrs["seed"]  # the original's numbers
    parents, children = runs(isolated)
    statuses = {int(c.data.tags["trial_number"]): c.info.status for c in children}
    assert statuses == {0: "FAILED", 1: "FINISHED", 2: "FINISHED"} and parents[0].info.status == "FINISHED"
    # the retry resumed after the last epoch its original finished, from its checkpoint
    resumed = trials[1].user_attrs["resumed_epochs"]
    assert 1 <= resumed <= len(trials[0].intermediate_values)
    assert [trials[1].intermediate_values[e] for e in range(1, resumed + 1)] == \
        [trials[0].intermediate_values[e] for e in range(1, resumed + 1)]
    retry = next(c for c in children if c.data.tags["trial_number"] == "1")
    assert retry.data.tags["resumed_from"] == "0" and retry.data.tags["resumed_epochs"] == str(resumed)
    assert len(MlflowClient().get_metric_history(retry.info.run_id, "val_accuracy")) == 4  # every epoch, once
    assert list(checkpoint.parent.iterdir()) == []  # each went when its trial ended
    written = [p for root in (isolated / "mlruns", isolated / "cache") for p in [root, *root.rglob("*")]]
    assert len(written) > 20 and [p for p in written if p.stat().st_mode & 0o002] == []
    for private in ("optuna.journal", "mlflow.db"):
        assert (isolated / "mlruns" / private).stat().st_mode & 0o077 == 0


def test_sigkill_of_the_whole_sweep_then_the_same_command_finishes_the_budget(isolated: Path,
                                                                             cifar_slice: Path) -> None:
    args = ["lr_dropout", "--trials", "2", "--epochs", "4", "--data", str(cifar_slice)]
    process = subprocess.Popen([sys.executable, "-m", "cifar_exp.sweep", *args], cwd=isolated,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
                               start_new_session=True)
    wait_for_first_epoch(isolated, process)
    checkpoint = sidecar.checkpoint(str(isolated / "mlruns" / "optuna.journal"), "lr_dropout", 0)
    while not checkpoint.exists() and process.poll() is None:  # written after the epoch's report
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its workers, with no chance to record anything
    process.wait(timeout=60)
    (stale,) = study(isolated).get_trials()
    assert stale.state == TrialState.RUNNING
    _, children = runs(isolated)
    assert [c.info.status for c in children] == ["RUNNING"]

    # Another study of the same name in the same folder, on the same data and settings: its trial 0
    # has trial 0's configuration and seed, but never its checkpoint, and its end leaves it alone.
    run_sweep(isolated, *args[:1], "--trials", "1", *args[3:], "--storage", "mlruns/b.journal",
              "--tracking-uri", f"sqlite:///{isolated}/mlruns/b.db")
    mlflow.set_tracking_uri(f"sqlite:///{isolated}/mlruns/b.db")
    (other,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("lr_dropout").experiment_id],
                                          "tags.trial_number = '0'")
    assert "resumed_epochs" not in other.data.tags and other.info.status == "FINISHED"
    assert len(MlflowClient().get_metric_history(other.info.run_id, "val_accuracy")) == 4
    assert checkpoint.exists()

    out = run_sweep(isolated, *args).stdout
    assert "trial 0 was left running by a worker that is gone: failed, retried once" in out
    trials = study(isolated).get_trials()
    assert trials[0].state == TrialState.FAIL and [t.state in FINISHED for t in trials[1:]] == [True, True]
    assert "is gone" in trials[0].user_attrs["fail_reason"]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    parents, children = runs(isolated)
    statuses = {int(c.data.tags["trial_number"]): c.info.status for c in children}
    assert statuses == {0: "KILLED", 1: "FINISHED", 2: "FINISHED"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert trials[1].user_attrs["resumed_epochs"] >= 1  # from its own study's checkpoint, still there


def _await_status(pid: int, done: Callable[[dict[str, str]], object]) -> None:
    """Wait until ``done`` holds of process ``pid``'s ``/proc/PID/status`` fields."""
    deadline = time.monotonic() + 120
    while True:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        if done(dict(line.split(":\t", 1) for line in lines if ":\t" in line)):
            return
        assert time.monotonic() < deadline, f"process {pid} never reached the awaited state"
        time.sleep(0.05)


def test_ctrl_c_kills_the_running_trial_and_the_same_command_resumes_it_from_its_checkpoint(
        isolated: Path, cifar_slice: Path) -> None:
    """Ctrl-C (or a scheduler's SIGTERM: the command treats both alike) ends the running trial as
    interrupted, keeps its checkpoint and queues its retry; the same command resumes the trial
    from its last epoch, and the interrupted trial does not count against the budget."""
    args = [sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "1", "--epochs", "4",
            "--data", str(cifar_slice)]
    process = subprocess.Popen(args, cwd=isolated, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=clean_env())
    # The worker is held still while Ctrl-C reaches the command and the command's SIGTERM reaches
    # the worker, so the trial cannot end while the signals travel.
    worker = int(wait_for_first_epoch(isolated, process).user_attrs["worker_pid"])
    os.kill(worker, signal.SIGSTOP)
    _await_status(worker, lambda status: status["State"].startswith("T"))
    process.send_signal(signal.SIGINT)
    _await_status(worker, lambda status: int(status["ShdPnd"], 16) & 1 << (signal.SIGTERM - 1))
    os.kill(worker, signal.SIGCONT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "run the same command to resume" in err

    trial, retry = study(isolated).get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") is True, (trial.user_attrs, err)
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == 0
    parents, children = runs(isolated)
    assert children[0].info.status == "KILLED" and parents[0].info.status == "KILLED"

    run_sweep(isolated, "lr_dropout", "--trials", "1", "--epochs", "4", "--data", str(cifar_slice))
    trials = study(isolated).get_trials()
    # the interrupted trial does not count against the budget: its retry completes it
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["resumed_epochs"] >= 1  # from trial 0's checkpoint, kept for it
    assert trials[1].params == trials[0].params
    parents, children = runs(isolated)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2


def test_sigkill_of_the_sweep_command_alone_takes_its_workers_with_it(isolated: Path, cifar_slice: Path) -> None:
    from cifar_exp.sweep.worker import ORPHAN_GRACE_SECONDS

    args = ["lr_dropout", "--trials", "2", "--epochs", "3", "--data", str(cifar_slice), "--workers", "2"]
    process = subprocess.Popen([sys.executable, "-m", "cifar_exp.sweep", *args], cwd=isolated,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    wait_for_first_epoch(isolated, process)
    workers = psutil.Process(process.pid).children(recursive=True)  # the workers and multiprocessing's helper
    assert workers, "no worker process found"
    process.kill()  # the command only: its workers are re-parented, as after an OOM kill of the CLI
    process.wait(timeout=60)
    killed = time.monotonic()
    alive = workers
    # They stop within ORPHAN_GRACE_SECONDS of noticing; the deadline is generous: with both cores
    # busy, workers were still running 15.2 s after the kill, and ended later.
    while alive and time.monotonic() - killed < ORPHAN_GRACE_SECONDS + 60:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    assert not alive, f"{len(alive)} worker(s) outlived the sweep command by {time.monotonic() - killed:.1f} s"

    out = run_sweep(isolated, *args[:-2]).stdout  # the next start ends whatever they held, and finishes the budget
    trials = study(isolated).get_trials()
    # the budget, exactly: the trials the orphans held ended interrupted, which do not count
    assert sum(t.state in FINISHED and not t.user_attrs.get("interrupted") for t in trials) == 2, out
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def _running(process: psutil.Process) -> bool:
    """Still running: not gone, and not a zombie (a process that has ended, whose exit status
    waits for the process that adopted it, here the container's init, to collect it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
