"""A sweep stopped the hard ways, in real processes: a worker killed mid-epoch, the whole sweep
killed, Ctrl-C, the sweep command killed alone, and two commands started at once on one store.
Every budget still finishes, nothing is counted twice, and no process outlives its sweep."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

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
    checkpoint = isolated / "mlruns" / "checkpoints" / "lr_dropout" / "0.npz"
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
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its workers, with no chance to record anything
    process.wait(timeout=60)
    (stale,) = study(isolated).get_trials()
    assert stale.state == TrialState.RUNNING
    _, children = runs(isolated)
    assert [c.info.status for c in children] == ["RUNNING"]

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


def _await_status(pid: int, done: Callable[[dict[str, str]], object]) -> None:
    """Wait until ``done`` holds of process ``pid``'s ``/proc/PID/status`` fields."""
    deadline = time.monotonic() + 120
    while True:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        if done(dict(line.split(":\t", 1) for line in lines if ":\t" in line)):
            return
        assert time.monotonic() < deadline, f"process {pid} never reached the awaited state"
        time.sleep(0.05)


def test_ctrl_c_kills_the_running_trial_and_the_same_command_resumes(isolated: Path, cifar_slice: Path) -> None:
    args = [sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "2", "--epochs", "2",
            "--data", str(cifar_slice)]
    process = subprocess.Popen(args, cwd=isolated, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=clean_env())
    assert process.stdout is not None
    for line in process.stdout:  # wait until trial 0 has begun
        if line.startswith("trial 0 started"):
            break
    # The worker is held still while Ctrl-C reaches the command and the command's SIGTERM reaches
    # the worker, so the trial cannot end, nor the next begin, while the signals travel.
    worker = int(study(isolated).get_trials()[0].user_attrs["worker_pid"])
    os.kill(worker, signal.SIGSTOP)
    _await_status(worker, lambda status: status["State"].startswith("T"))
    process.send_signal(signal.SIGINT)
    _await_status(worker, lambda status: int(status["ShdPnd"], 16) & 1 << (signal.SIGTERM - 1))
    os.kill(worker, signal.SIGCONT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "run the same command to resume" in err

    (trial,) = study(isolated).get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") is True, (trial.user_attrs, err)
    parents, children = runs(isolated)
    assert children[0].info.status == "KILLED" and parents[0].info.status == "KILLED"

    run_sweep(isolated, "lr_dropout", "--trials", "2", "--epochs", "2", "--data", str(cifar_slice))
    trials = study(isolated).get_trials()
    # the interrupted trial does not count against the budget: two complete trials follow it
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    parents, children = runs(isolated)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 3


def test_sigkill_of_the_sweep_command_alone_takes_its_workers_with_it(isolated: Path, cifar_slice: Path) -> None:
    from cifar_exp.sweep.worker import ORPHAN_GRACE_SECONDS

    args = ["lr_dropout", "--trials", "2", "--epochs", "6", "--data", str(cifar_slice), "--workers", "2"]
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


def test_two_sweep_commands_started_at_once_on_a_fresh_store_share_the_budget(isolated: Path,
                                                                               cifar_slice: Path) -> None:
    args = [sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "2", "--epochs", "1", "--data",
            str(cifar_slice)]
    processes = [subprocess.Popen(args, cwd=isolated, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=clean_env()) for _ in range(2)]
    outcomes = [p.communicate(timeout=900) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outcomes]
    trials = study(isolated).get_trials()
    assert [t.state in FINISHED for t in trials] == [True, True]  # the budget, exactly
    parents, children = runs(isolated)
    assert len(parents) == 1 and len(children) == 2


CREATE_STORE = """
import os, signal, sys
import sqlalchemy
from cifar_exp import track

def kill_at(conn, cursor, statement, *args):  # SIGKILL itself as MLflow sends this statement
    if sys.argv[2] and sys.argv[2] in statement:
        os.kill(os.getpid(), signal.SIGKILL)

sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", kill_at)
print("ready", flush=True)
track.configure(sys.argv[1])
print("made", flush=True)
sys.stdin.read()  # a kill after a delay always finds it alive: mid-creation or done, never exited
"""
# Statements of MLflow's schema creation to die at: the first table, a migration halfway through
# its copy of a table (SQLite's batch ALTER), the version stamp at the end.
KILL_AT = ("CREATE TABLE experiments", "CREATE TABLE _alembic_tmp_experiments", "INSERT INTO _alembic_tmp_runs",
           "UPDATE alembic_version")


@pytest.mark.parametrize("when", [*KILL_AT, 0.3, 1.0, 2.0], ids=str)
def test_a_kill_at_any_point_of_a_store_s_creation_leaves_a_store_that_works(isolated: Path, when: str | float) -> None:
    """SIGKILL a first start inside MLflow's schema creation, at a statement or after a delay; the
    next start then works, on a complete schema, and leaves no temporary file."""
    from mlflow.tracking import MlflowClient

    from cifar_exp import track

    uri = f"sqlite:///{isolated}/store/mlflow.db"
    creator = subprocess.Popen([sys.executable, "-c", CREATE_STORE, uri, when if isinstance(when, str) else ""],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env())
    assert creator.stdout is not None and creator.stdout.readline() == "ready\n"
    if isinstance(when, float):
        time.sleep(when)
        creator.kill()
    assert creator.wait(timeout=120) == -signal.SIGKILL
    track.configure(uri)  # the next start, whatever the kill left
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("after-the-kill"))
    client.log_metric(run.info.run_id, "val_accuracy", 0.5)
    assert client.get_run(run.info.run_id).data.metrics == {"val_accuracy": 0.5}
    assert not [p.name for p in (isolated / "store").iterdir() if "creating" in p.name]


def test_a_full_disk_then_a_read_only_store_are_one_line_and_exit_2_and_a_resume_leaves_nothing_running(
        isolated: Path, cifar_slice: Path) -> None:
    """The whole store on a 3 MB tmpfs (a private mount namespace): trial 0's model fills it, the
    sweep ends with one line and exit 2. Copied to a roomy disk, the same command resumes and
    leaves no trial and no run RUNNING. Then, bound read-only, every command is one line, exit 2."""
    sweep = f"{sys.executable} -m cifar_exp.sweep lr_dropout --trials 3 --epochs 1 --data {cifar_slice}"
    script = (f"mkdir -p mlruns && mount -t tmpfs -o size=3m tmpfs mlruns && {sweep} >out.txt 2>err.txt; "
              f"echo $? >rc.txt; cp -a mlruns kept")
    subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=isolated, check=True,
                   timeout=900, env=clean_env())
    err = (isolated / "err.txt").read_text()
    assert (isolated / "rc.txt").read_text().strip() == "2", err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot write the MLflow store: the disk is full"), err
    subprocess.run(["cp", "-a", "kept/.", "mlruns/"], cwd=isolated, check=True)
    resumed = subprocess.run(sweep.split(), cwd=isolated, capture_output=True, text=True, timeout=900,
                             env=clean_env())
    assert resumed.returncode == 0, resumed.stderr
    trials = study(isolated).get_trials()
    assert TrialState.RUNNING not in {t.state for t in trials} and len(trials) >= 3
    parents, children = runs(isolated)
    assert {r.info.status for r in parents + children} <= {"FINISHED", "FAILED", "KILLED"}
    assert len(children) == len(trials)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(isolated / "x.png")
    commands = [f"sweep lr_dropout --trials 4 --data {cifar_slice}", "report lr_dropout", "compare lr_dropout",
                "register lr_dropout", "predict x.png --model models:/cifar10-lr_dropout/1"]
    script = "mount --bind mlruns mlruns && mount -o remount,ro,bind mlruns && " + shlex.join(
        [sys.executable, "-c", EACH_COMMAND, *commands])  # one process for the five: 5 to 7 s of imports each
    ran = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=isolated,
                         capture_output=True, text=True, timeout=900, env=clean_env())
    assert ran.returncode == 0, ran.stderr
    outcomes = [line.split("\t", 1) for line in ran.stdout.splitlines()]
    assert [code for code, _ in outcomes] == ["2"] * len(commands), outcomes
    for c, (_, err) in zip(commands, outcomes, strict=True):
        (line,) = json.loads(err).strip().splitlines()
        assert line.startswith("error: cannot write") and "Read-only file system" in line, (c, line)


# Each argument a command line of ``cifar-exp``, run in this one process in turn (``cli.main``);
# prints its exit code and its stderr (as JSON), a tab between, a line per command.
EACH_COMMAND = """
import contextlib, io, json, sys
from cifar_exp.cli import main
for command in sys.argv[1:]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(command.split())
    print(code, json.dumps(err.getvalue()), sep="\t", flush=True)
"""


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
