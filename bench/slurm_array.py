"""A tiny sweep as a Slurm job array against one worker, and a trial resumed on another task
against the same trial run uninterrupted.

    python bench/slurm_array.py --data data/cifar10-jpeg.zip --train-images 400 --trials 6 --epochs 4 --tasks 2

On this machine: a one-node Slurm cluster (``tests.test_slurm.one_node_cluster``: munged,
slurmctld, slurmd, three gres GPUs on character devices), PostgreSQL and an MLflow server
(``bench.coordination.start_servers``). Three runs of the test sweep (tests/sweeps/cluster.yaml,
the given budget, a class-balanced subset of the data):

1. ``cifar-exp launch slurm --submit`` with ``--tasks`` tasks: wall seconds from submission until
   the array is gone, trials per hour;
2. the same sweep as one ``cifar-exp sweep --workers 1`` on a fresh database: the same figures;
3. the array again, one task's worker sent SIGTERM through its batch shell after the first epoch
   of a trial; the trial's retry (resumed from the shared checkpoint on whichever task claimed
   it) against ``cifar-exp rerun`` of it (the same recipe trained from epoch 0 uninterrupted):
   every per-epoch metric and test metric compared.

Prints the figures and writes bench/slurm_array.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _gone(env: dict[str, str], job: str, deadline: float) -> None:
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the array never ended"
        time.sleep(0.5)


def _array(env: dict[str, str], folder: Path, sweep: Path, storage: str, tracking: str, tasks: int) -> str:
    done = subprocess.run([sys.executable, "-m", "cifar_exp", "launch", "slurm", str(sweep), "--storage", storage,
                           "--tracking-uri", tracking, "--checkpoint-dir", str(folder / "shared"), "--tasks",
                           str(tasks), "--gpus", "1", "--cpus", "1", "--time", "60", "--submit"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("submitted job ")[1].split()[0]


def _database(url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{url}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{url}/{name}"


def _interrupt(env: dict[str, str], storage: str, tracking: str, job: str) -> tuple[int, str]:
    """SIGTERM, through its task's batch shell, the first trial that reports an epoch: its number
    and its task."""
    import optuna
    from mlflow.tracking import MlflowClient

    from tests.test_kills import _await_status

    deadline = time.monotonic() + 600
    while True:
        try:
            study = optuna.load_study(study_name="cluster", storage=storage)
            running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
                       and t.intermediate_values and t.user_attrs.get("mlflow_run_id")]
        except KeyError:
            running = []
        if running:
            break
        assert time.monotonic() < deadline, "no trial trained an epoch"
        time.sleep(0.2)
    trial = running[0]
    task = MlflowClient(tracking).get_run(trial.user_attrs["mlflow_run_id"]).data.tags["slurm_array_task_id"]
    worker = int(trial.user_attrs["worker_pid"])
    os.kill(worker, signal.SIGSTOP)
    _await_status(worker, lambda status: status["State"].startswith("T"))
    subprocess.run(["scancel", "--batch", "--signal=TERM", f"{job}_{task}"], env=env, check=True)
    _await_status(worker, lambda status: int(status["ShdPnd"], 16) & 1 << (signal.SIGTERM - 1))
    os.kill(worker, signal.SIGCONT)
    return trial.number, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the CIFAR-10 copy (e.g. data/cifar10-jpeg.zip)")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=2)
    args = parser.parse_args()
    import optuna

    from bench.coordination import cpu_model, start_servers
    from tests.test_slurm import one_node_cluster

    folder = Path(tempfile.mkdtemp(prefix="cifar_exp-slurm-bench-"))
    folder.chmod(0o755)
    (folder / "shared").mkdir()
    sweep = folder / "cluster.yaml"
    text = (ROOT / "tests" / "sweeps" / "cluster.yaml").read_text()
    text = text.replace("epochs: 4", f"epochs: {args.epochs}").replace("trials: 4", f"trials: {args.trials}")
    sweep.write_text(text + f"data: {{source: {os.path.abspath(args.data)}, train_images: {args.train_images}}}\n")
    (folder / "pg").mkdir()
    url, tracking, stop = start_servers(folder / "pg")
    found: dict[str, Any] = {}
    try:
        with one_node_cluster() as env:
            env = {**env, "CIFAR_EXP_CACHE": str(folder / "cache")}
            for name, tasks in (("array", args.tasks), ("one_worker", 0)):
                storage = _database(url, f"bench_{name}")
                start = time.monotonic()
                if tasks:
                    _gone(env, _array(env, folder, sweep, storage, tracking, tasks), time.monotonic() + 3600)
                else:
                    subprocess.run([sys.executable, "-m", "cifar_exp", "sweep", str(sweep), "--storage", storage,
                                    "--tracking-uri", tracking, "--workers", "1"], cwd=folder, env=env,
                                   capture_output=True, check=True, timeout=3600)
                wall = time.monotonic() - start
                trials = optuna.load_study(study_name="cluster", storage=storage).get_trials()
                complete = sum(t.state.name == "COMPLETE" for t in trials)
                found[name] = {"wall_s": wall, "complete": complete, "trials_per_hour": complete / wall * 3600}
                print(f"{name}: {complete} trials in {wall:.1f} s = {found[name]['trials_per_hour']:.0f} trials/h",
                      flush=True)
            storage = _database(url, "bench_resumed")
            job = _array(env, folder, sweep, storage, tracking, args.tasks)
            number, _ = _interrupt(env, storage, tracking, job)
            _gone(env, job, time.monotonic() + 3600)
            trials = optuna.load_study(study_name="cluster", storage=storage).get_trials()
            (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == number]
            rerun = subprocess.run([sys.executable, "-m", "cifar_exp", "rerun", retry.user_attrs["mlflow_run_id"],
                                    "--tracking-uri", tracking], cwd=folder, env=env, capture_output=True, text=True,
                                   timeout=3600)
            found["resumed"] = {"trial": number, "retry": retry.number,
                                "resumed_epochs": retry.user_attrs.get("resumed_epochs"),
                                "rerun_exit_code": rerun.returncode, "rerun_report": rerun.stdout.strip()[-1500:]}
            print(f"trial {number} stopped, its retry {retry.number} resumed after "
                  f"{retry.user_attrs.get('resumed_epochs')} epoch(s); rerun from epoch 0 uninterrupted: exit "
                  f"{rerun.returncode}\n{rerun.stdout.strip()[-1500:]}", flush=True)
    finally:
        for step in stop:
            step()
        shutil.rmtree(folder, ignore_errors=True)
    found["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    (ROOT / "bench" / "slurm_array.json").write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
