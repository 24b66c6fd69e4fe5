"""How far the coordination layer scales: K worker processes claim, report epochs and tell null
trials (no training) against PostgreSQL and an MLflow server, as fast as they can.

    python bench/coordination.py --processes 1 2 4 8 16 32 64 --trials-per-process 8 --epochs 5

Starts its own PostgreSQL cluster (initdb on a free loopback port, as the tests do) and an
``mlflow server`` on it (one worker process, runs in PostgreSQL), unless ``--storage`` and
``--tracking-uri`` name running ones. Per K: a fresh study of the lr_dropout sweep (TPE) with a
budget of K x trials-per-process; each process loops over what a worker does around a trial,
with the project's own functions: ``sweep.storage.claim`` (the budget lock, stale recovery, the
stamp, then sampling), the trial's heartbeat thread, its MLflow run under the study's parent
with its params, ``epochs`` epochs each reported to Optuna (``report``, ``should_prune``) and
logged to MLflow, then ``study.tell`` and the run ended. Measured from a barrier after every
process has imported and connected: trials per second, the claim's seconds (p50, p99), a
trial's whole coordination seconds (p50, p99). Writes bench/coordination.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_servers(folder: Path) -> tuple[str, str, list[Any]]:
    """A PostgreSQL cluster (databases ``optuna`` and ``mlflow``) and an MLflow server on it:
    ``(database URL without a database, tracking URI, what to stop)``."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1].parent
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "bench",
                    "--auth-host=trust", "--auth-local=trust"], check=True, capture_output=True)
    # max_connections: K workers hold 2 to 4 connections each, and the MLflow server its pool
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "log"),
                    "-w", "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=400",
                    "start"], check=True, capture_output=True)
    url = f"postgresql://bench@127.0.0.1:{port}"
    import psycopg

    with psycopg.connect(f"{url}/postgres", autocommit=True) as connection:
        connection.execute("CREATE DATABASE mlflow")
    mlflow_port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{url}/mlflow",
                               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(mlflow_port), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5):
                break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "the MLflow server did not start"
            time.sleep(1)
    stop = [lambda: os.killpg(server.pid, 9),
            lambda: subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-m",
                                    "immediate", "stop"], capture_output=True)]
    return url, f"http://127.0.0.1:{mlflow_port}", stop


def worker(settings: Any, experiment: str, parent: str, epochs: int, barrier: Any, results: Any) -> None:
    """One worker's loop around null trials; puts ``[(claim seconds, whole seconds), ...]``."""
    import optuna

    from cifar_exp import track
    from cifar_exp.sweep import recovery, storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    track.configure(settings.tracking_uri)
    opened = storage.open_storage(settings.storage)
    track.get_run(parent)  # the MLflow client's connection, before the clock starts
    barrier.wait()
    times = []
    while True:
        start = time.perf_counter()
        claimed = storage.claim(settings, opened)
        claim_s = time.perf_counter() - start
        if claimed == "done":
            break
        if claimed == "wait":
            time.sleep(0.05)
            continue
        trial = claimed.trial
        with recovery.heartbeat(opened, trial):
            run_id = track.start_trial_run(experiment, parent, trial.number, claimed.params, {"engine": "bench"})
            for epoch in range(epochs):
                value = 0.1 + 0.01 * epoch
                trial.report(value, epoch)
                trial.should_prune()
                track.log_metrics(run_id, {"val_accuracy": value, "loss": 2.0 - value}, step=epoch)
            claimed.study.tell(trial, value)
            track.end_run(run_id, "FINISHED", {"state": "COMPLETE"})
        times.append((claim_s, time.perf_counter() - start))
    results.put(times)


def one(k: int, per: int, epochs: int, url: str, tracking: str) -> dict[str, Any]:
    """K processes on a fresh study of K x ``per`` trials."""
    import psycopg

    from cifar_exp import track
    from cifar_exp.config import Settings
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.sweep import storage

    database = f"bench_{k}_{int(time.time())}"
    with psycopg.connect(f"{url}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    sweep = dataclasses.replace(load_sweep("lr_dropout"), trials=k * per, name=f"bench{k}")
    settings = Settings(sweep=sweep, storage=f"{url}/{database}", tracking_uri=tracking, data_checksum="bench")
    storage.create_study(settings)
    track.configure(tracking)
    experiment = track.experiment_id(f"bench-{database}")
    parent = track.start_run(experiment, "bench-study", {}, {})
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(k + 1), context.Queue()
    processes = [context.Process(target=worker, args=(settings, experiment, parent, epochs, barrier, results))
                 for _ in range(k)]
    for process in processes:
        process.start()
    barrier.wait()
    start = time.perf_counter()
    times = [t for _ in processes for t in results.get(timeout=3600)]
    wall = time.perf_counter() - start
    for process in processes:
        process.join()
    track.end_run(parent, "FINISHED")
    claims = sorted(c for c, _ in times)
    wholes = sorted(w for _, w in times)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"processes": k, "trials": len(times), "wall_s": wall, "trials_per_s": len(times) / wall,
            "claim_p50_s": statistics.median(claims), "claim_p99_s": pct(claims, 0.99),
            "trial_p50_s": statistics.median(wholes), "trial_p99_s": pct(wholes, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--trials-per-process", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--storage", help="a running PostgreSQL server's URL, without a database (default: start one)")
    parser.add_argument("--tracking-uri", help="a running MLflow server (default: start one)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "coordination.json"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cifar_exp-bench-"))
    stop: list[Any] = []
    try:
        url, tracking = args.storage, args.tracking_uri
        if url is None or tracking is None:
            url, tracking, stop = start_servers(folder)
        rows = []
        for k in args.processes:
            row = one(k, args.trials_per_process, args.epochs, url, tracking)
            rows.append(row)
            print(f"{k:3d} processes: {row['trials']:4d} trials in {row['wall_s']:6.1f} s = "
                  f"{row['trials_per_s']:6.2f} trials/s; claim p50 {row['claim_p50_s']:.3f} s, "
                  f"p99 {row['claim_p99_s']:.3f} s; a trial's coordination p50 {row['trial_p50_s']:.3f} s, "
                  f"p99 {row['trial_p99_s']:.3f} s", flush=True)
        machine = {"cpu": cpu_model(), "cores": os.cpu_count(),
                   "python": platform.python_version()}
        Path(args.out).write_text(json.dumps({"machine": machine, "epochs": args.epochs, "rows": rows}, indent=2))
    finally:
        for step in stop:
            step()
        shutil.rmtree(folder, ignore_errors=True)


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() is empty on Linux)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
