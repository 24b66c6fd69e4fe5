"""A sweep launched on a real Slurm cluster (slow tier): Debian's ``slurmctld``, ``slurmd`` and
``munge`` started on localhost without systemd or cgroups (``proctrack/linuxproc``,
``task/none``, ``select/cons_tres``, state and spool in a temporary folder), three GPUs declared as
``gres`` on character devices (as Slurm's own test suite does), so each array task sees its own
``CUDA_VISIBLE_DEVICES``. ``cifar-exp launch slurm --submit`` runs a job array of two tasks against
the tests' PostgreSQL and an MLflow server; one task is sent SIGTERM mid-trial."""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT
from tests.test_hosts import free_port, mlflow_server, postgres  # noqa: F401  (fixtures)
from tests.test_kills import _await_status
from tests.test_sweep import clean_env

pytestmark = pytest.mark.slow
SWEEP = ROOT / "tests" / "sweeps" / "cluster.yaml"
# A requeued job waits a credential lifetime before it starts again (slurm.conf(5), cred_expire:
# 120 s by default), so that slurmd has forgotten the credentials it revoked when the job's first
# run was killed. Forcing it to start earlier (`scontrol update StartTime=now`) raced with that:
# slurmd refused the launch ("Job 2 already killed, do not launch batch job") and the task failed
# on CI. A short lifetime keeps Slurm's own path and the test's wait short.
CRED_EXPIRE = 10


def _config(root: Path, user: str) -> str:
    return f"""ClusterName=cifarexp
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerParameters=sched_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
MinJobAge=600
NodeName=localhost NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} Gres=gpu:3 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A one-node Slurm cluster of this machine (``one_node_cluster``)."""
    with one_node_cluster() as env:
        yield env


@contextlib.contextmanager
def one_node_cluster() -> Iterator[dict[str, str]]:
    """A one-node Slurm cluster of this machine; yields the environment its commands need (also
    for ``bench/slurm_array.py``)."""
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), \
            f"{tool} is not installed: `apt-get install slurmctld slurmd slurm-client munge` (.ci/run does)"
    root = Path(tempfile.mkdtemp(prefix="cifar_exp-slurm-"))
    root.chmod(0o755)  # munged runs as munge, and must reach its folder
    for folder in ("state", "spool", "dev", "munge"):
        (root / folder).mkdir()
    for index in range(3):  # the GPUs: character devices, named as NVIDIA's are
        os.mknod(root / "dev" / f"nvidia{index}", 0o666 | 0o020000, os.makedev(1, 3))
    (root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={root}/dev/nvidia[0-2]\n")
    (root / "slurm.conf").write_text(_config(root, getpass.getuser()))
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    as_munge: list[str] = []
    if os.geteuid() == 0:  # munged refuses to run as root
        munge = pwd.getpwnam("munge")
        for path in (root / "munge", key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        as_munge = ["runuser", "-u", "munge", "--"]
    key.chmod(0o400)
    env = clean_env(SLURM_CONF=str(root / "slurm.conf"), SLURM_TEST_ROOT=str(root))
    daemons = [[*as_munge, "/usr/sbin/munged", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
                f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                f"--seed-file={root}/munge/munge.seed"],
               ["/usr/sbin/slurmctld", "-c"], ["/usr/sbin/slurmd", "-N", "localhost"]]
    try:
        for command in daemons:
            subprocess.run(command, check=True, env=env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                           text=True).stdout:
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        # Jobs end before the daemons do: a slurmstepd whose slurmd is gone outlives the test.
        subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "-h", "-t", "running,completing"], env=env, capture_output=True, text=True
        ).stdout.strip():
            time.sleep(0.5)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            try:
                os.kill(int((root / pid_file).read_text()), 9)
            except (OSError, ValueError):
                pass
        shutil.rmtree(root, ignore_errors=True)


def _slurm(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _a_trial_mid_training(study: optuna.Study, client: MlflowClient, job: str, env: dict[str, str]) -> tuple[int, str]:
    """(the number of a trial that has reported an epoch and is still running, its array task)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert _slurm(env, "squeue", "-h", "-j", job).strip(), "the job ended before a trial trained an epoch"
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = trial.user_attrs.get("mlflow_run_id")
            if trial.intermediate_values and run_id:
                return trial.number, client.get_run(run_id).data.tags["slurm_array_task_id"]
        time.sleep(0.2)
    raise AssertionError("no trial reported an epoch")


def test_a_job_array_meets_the_budget_and_a_task_stopped_mid_trial_is_resumed_from_the_shared_checkpoint(
        slurm: dict[str, str], postgres: str, mlflow_server: str, cifar_slice: Path,  # noqa: F811
        tmp_path: Path) -> None:
    import psycopg

    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as connection:
        connection.execute("CREATE DATABASE slurm_study")
    storage = f"{postgres}/slurm_study"
    sweep = tmp_path / "cluster.yaml"  # the shipped test sweep, on the data slice
    sweep.write_text(SWEEP.read_text() + f"data: {{source: {cifar_slice}}}\n")
    shared = tmp_path / "shared-checkpoints"
    shared.mkdir()
    env = {**slurm, "CIFAR_EXP_CACHE": str(tmp_path / "cache")}
    launched = subprocess.run([sys.executable, "-m", "cifar_exp", "launch", "slurm", str(sweep), "--storage", storage,
                               "--tracking-uri", mlflow_server, "--checkpoint-dir", str(shared), "--tasks", "2",
                               "--gpus", "1", "--cpus", "1", "--time", "20", "--submit"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr
    job = launched.stdout.split("submitted job ")[1].split()[0]

    study = optuna.load_study(study_name="cluster", storage=storage) if _wait_for_study(storage) else None
    assert study is not None
    client = MlflowClient(mlflow_server)
    number, task = _a_trial_mid_training(study, client, job, env)
    # The trial's worker is held still while SIGTERM reaches the task's batch shell (as Slurm's
    # time limit signals it), the shell forwards it to the sweep and the sweep to the worker, so
    # the trial cannot end before the signal arrives.
    worker = int(study.get_trials()[number].user_attrs["worker_pid"])
    os.kill(worker, signal.SIGSTOP)
    _await_status(worker, lambda status: status["State"].startswith("T"))
    _slurm(env, "scancel", "--batch", "--signal=TERM", f"{job}_{task}")
    _await_status(worker, lambda status: int(status["ShdPnd"], 16) & 1 << (signal.SIGTERM - 1))
    os.kill(worker, signal.SIGCONT)
    # The task requeues itself and starts again CRED_EXPIRE seconds later, on its own.
    deadline = time.monotonic() + 600
    while _slurm(env, "squeue", "-h", "-j", job).strip():
        assert time.monotonic() < deadline, _slurm(env, "squeue", "-j", job)
        time.sleep(0.5)

    trials = study.get_trials()
    logs = "\n".join(p.read_text() for p in (tmp_path / "mlruns" / "logs" / "slurm").glob("*.out"))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], logs[-3000:]
    stopped = trials[number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs.get("interrupted") is True, logs[-3000:]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4  # the budget, exactly: the interrupted trial does not count
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_epochs"] >= 1  # the shared checkpoint
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}
    assert len({r.info.run_id for r in runs.values()}) == len(trials)  # one run per trial, none duplicated
    for run in runs.values():
        tags = run.data.tags
        assert tags["slurm_array_job_id"] == job and tags["slurm_array_task_id"] in ("0", "1")
        assert tags["cuda_visible_devices"] in ("0", "1", "2") and tags["host"] == socket.gethostname()
    assert runs[retry.number].data.tags["resumed_from"] == str(number)
    # the stopped task requeued itself, ran again and ended with the budget met
    shown = _slurm(env, "scontrol", "show", "job", f"{job}_{task}")
    slurmd_log = Path(env["SLURM_TEST_ROOT"], "slurmd.log").read_text()[-3000:]
    assert "Restarts=1" in shown and "JobState=COMPLETED" in shown and "ExitCode=0:0" in shown, \
        shown + logs[-2000:] + slurmd_log


def _wait_for_study(storage: str) -> bool:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            optuna.load_study(study_name="cluster", storage=storage)
            return True
        except KeyError:
            time.sleep(0.5)
    return False


def test_the_pods_command_runs_here_with_the_variables_a_pod_gets(
        postgres: str, mlflow_server: str, cifar_slice: Path, tmp_path: Path) -> None:  # noqa: F811
    """No Kubernetes runs here: the generated Job's container command runs as a process, with the
    variables an Indexed Job's pod gets, and its trials' runs name the pod and its index."""
    import psycopg
    import yaml

    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as connection:
        connection.execute("CREATE DATABASE pod_study")
    sweep = tmp_path / "cluster.yaml"
    sweep.write_text(SWEEP.read_text().replace("epochs: 4", "epochs: 1").replace("trials: 4", "trials: 1")
                     + f"data: {{source: {cifar_slice}}}\n")
    (tmp_path / "ckpt").mkdir()
    launched = subprocess.run([sys.executable, "-m", "cifar_exp", "launch", "k8s", str(sweep), "--storage",
                               f"{postgres}/pod_study", "--tracking-uri", mlflow_server, "--checkpoint-dir",
                               str(tmp_path / "ckpt"), "--image", "cifar-exp:test", "--out", "job.yaml"],
                              cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr
    (container,) = yaml.safe_load((tmp_path / "job.yaml").read_text())["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "cifar-exp"
    pod = {"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "cifar-exp-cluster-1-x7k2p", "POD_NAMESPACE": "sweeps",
           "CIFAR_EXP_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "cifar_exp", *container["command"][1:]], cwd=tmp_path,
                          env=clean_env(**pod), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (trial,) = optuna.load_study(study_name="cluster", storage=f"{postgres}/pod_study").get_trials()
    tags = MlflowClient(mlflow_server).get_run(trial.user_attrs["mlflow_run_id"]).data.tags
    assert tags["k8s_completion_index"] == "1" and tags["k8s_pod"] == "cifar-exp-cluster-1-x7k2p"
    assert tags["k8s_namespace"] == "sweeps"
