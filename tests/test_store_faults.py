"""The store under faults, in real processes: two sweep commands started at once on a fresh store,
a kill at any point of the store's creation, a full disk, a read-only store. The budget is kept
exactly, the next start works, and every failure is one line and exit code 2."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.test_sweep import FINISHED, clean_env, runs, study

pytestmark = pytest.mark.slow


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
    (line,) = err.strip().splitlines()  # one line: the report's failure goes to the library log
    # whichever write meets the full disk first (SQLite's store, or a file beside it), one line
    # that says so and how to go on
    assert line.startswith("error: cannot write") and ": the disk is full (" in line, err
    assert line.endswith("then run the same command again"), err
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
