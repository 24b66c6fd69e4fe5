"""A frozen worker (alive, but silent: SIGSTOP), in real processes: the sweep kills it past its
heartbeat grace and retries its trial; one left behind by a killed command is killed by the next
start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState

from tests.test_kills import _running, wait_for_first_epoch
from tests.test_sweep import clean_env, runs, study

pytestmark = pytest.mark.slow


FROZEN = str(Path(__file__).parent / "sweeps" / "frozen.yaml")  # heartbeat_grace: 8


def _frozen_worker(cwd: Path, cifar_slice: Path) -> tuple[subprocess.Popen, int]:
    """A sweep of ``frozen.yaml`` whose worker is SIGSTOPped in trial 0's second epoch: the sweep
    command and the worker's pid."""
    process = subprocess.Popen([sys.executable, "-m", "cifar_exp.sweep", FROZEN, "--data", str(cifar_slice)], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    pid = int(wait_for_first_epoch(cwd, process, name="frozen").user_attrs["worker_pid"])
    os.kill(pid, signal.SIGSTOP)
    return process, pid


def test_a_frozen_worker_is_killed_past_its_heartbeat_grace_and_its_trial_retried(isolated: Path,
                                                                                  cifar_slice: Path) -> None:
    process, pid = _frozen_worker(isolated, cifar_slice)
    stopped = time.monotonic()
    while study(isolated, "frozen").get_trials()[0].state == TrialState.RUNNING:
        assert time.monotonic() - stopped < 300, "the frozen worker's trial is still RUNNING"
        time.sleep(0.5)
    print(f"SIGSTOP to trial 0 failed: {time.monotonic() - stopped:.1f} s")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "trial 0 FAIL: worker process frozen: no heartbeat for" in out and "killed" in out
    assert not psutil.pid_exists(pid) or not _running(psutil.Process(pid))
    trials = study(isolated, "frozen").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    _, children = runs(isolated, "frozen")
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED"]


def test_a_frozen_worker_left_by_a_killed_command_is_killed_by_the_next_start(isolated: Path,
                                                                               cifar_slice: Path) -> None:
    process, pid = _frozen_worker(isolated, cifar_slice)
    process.kill()  # the command dies; its frozen worker cannot notice
    process.wait(timeout=60)  # not communicate(): the frozen worker still holds the pipes open
    assert _running(psutil.Process(pid)), "the frozen worker should outlive its killed command"
    again = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", FROZEN, "--data", str(cifar_slice)], cwd=isolated,
                           capture_output=True, text=True, timeout=600, env=clean_env())
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    process.stderr.close()
    assert again.returncode == 0, again.stderr
    assert not psutil.pid_exists(pid) or not _running(psutil.Process(pid))
    trials = study(isolated, "frozen").get_trials()
    assert trials[0].state == TrialState.FAIL and "(frozen): killed" in trials[0].user_attrs["fail_reason"]
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
