"""Many hosts, for real: a PostgreSQL server (Debian's package; `.ci/run` installs it) holds the
Optuna study and the MLflow server's runs, a real ``mlflow server`` on loopback holds the
artifacts, and two sweep processes (two "hosts") share one budget."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cifar_exp.sweep.storage import open_storage
from tests.test_sweep import clean_env

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-Pw-7"  # must never reach MLflow or the terminal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free loopback port, with a password-protected user and the
    databases ``optuna`` and ``mlflow``; yields ``postgresql://cifar:PASSWORD@127.0.0.1:PORT``."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)"
    bindir = found[-1].parent
    root = Path(tempfile.mkdtemp(prefix="cifar_exp-pg-"))  # not under pytest's 0700 tmp: postgres reads it
    (root / "pw").write_text(PASSWORD)
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam("postgres")
        for path in (root, root / "pw"):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "cifar",
                    f"--pwfile={root / 'pw'}", "--auth-host=scram-sha-256", "--auth-local=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    url = f"postgresql://cifar:{PASSWORD}@127.0.0.1:{port}"
    try:
        import psycopg

        with psycopg.connect(f"{url}/postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE optuna")
            connection.execute("CREATE DATABASE mlflow")
        yield url
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def start_mlflow_server(backend: str, folder: Path, port: int, *extra: str,
                        env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mlflow server`` on ``port`` of loopback, runs in ``backend``, artifacts served from
    ``folder``/artifacts; returns once it answers its health check."""
    log = folder / f"server-{port}.log"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", *extra], stdout=subprocess.DEVNULL,
                              stderr=log.open("a"), start_new_session=True,
                              # without MLflow's GenAI job runner: 2 processes, not 10 (as cifar-exp ui)
                              env=clean_env(**{"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}))
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port, one for the tests that need a plain one (the
    tests of a server going away, or behind basic auth, start their own): runs in PostgreSQL,
    artifacts served from a folder."""
    port = free_port()
    server = start_mlflow_server(f"{postgres}/mlflow", tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def _until_a_trial_starts(process: subprocess.Popen) -> str:
    """Read ``process``'s output until it says a trial started; what it read."""
    assert process.stdout is not None
    read = []
    for line in process.stdout:
        read.append(line)
        if line.startswith("trial ") and " started" in line:
            break
    return "".join(read)


def test_two_hosts_share_one_study_on_postgresql_and_one_mlflow_server(
        postgres: str, mlflow_server: str, isolated: Path, cifar_slice: Path) -> None:
    storage = f"{postgres}/optuna"
    args = [sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "4", "--epochs", "1",
            "--data", str(cifar_slice), "--storage", storage, "--tracking-uri", mlflow_server]
    hosts, seen, held = [], [], 0
    try:
        for name in ("host-a", "host-b"):  # two folders: nothing shared but the two servers
            (isolated / name).mkdir()
            hosts.append(subprocess.Popen(args, cwd=isolated / name, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=clean_env()))
            seen.append(_until_a_trial_starts(hosts[-1]))
            if name == "host-a":
                # The second host joins a study that is already running. Host a's worker is held
                # still until host b has started a trial, so both hosts run trials however fast
                # either one starts (the hold, host b's start, is well within the 60 s heartbeat grace).
                held = int(optuna.load_study(study_name="lr_dropout", storage=open_storage(storage))
                           .get_trials()[0].user_attrs["worker_pid"])
                os.kill(held, signal.SIGSTOP)
    finally:
        if held:
            os.kill(held, signal.SIGCONT)
    outputs = [(before + out, err) for before, (out, err) in
               zip(seen, (host.communicate(timeout=900) for host in hosts), strict=True)]
    for host, (out, err) in zip(hosts, outputs, strict=True):
        assert host.returncode == 0, err
        assert PASSWORD not in out + err
    assert "postgresql://cifar:***@127.0.0.1" in outputs[1][0]

    trials = optuna.load_study(study_name="lr_dropout", storage=open_storage(storage)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # the budget, not 4 per host
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2  # both hosts ran trials

    client = MlflowClient(mlflow_server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "lr_dropout"]
    found = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1, 2, 3]
    assert parents[0].data.tags["optuna_storage"].startswith("postgresql://cifar:***@127.0.0.1:")
    for run in found:  # no credential in any param or tag (the command line included)
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if PASSWORD in v]
    # artifacts went through the server to its artifact store
    files = {f.path for f in client.list_artifacts(children[0].info.run_id)}
    assert {"confusion_matrix.png", "sweep.yaml"} <= files


def test_a_tracking_server_that_is_down_at_start_is_a_clear_error(isolated: Path, cifar_slice: Path) -> None:
    port = free_port()  # nothing listens there
    result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "1", "--epochs",
                             "1", "--data", str(cifar_slice), "--tracking-uri", f"http://127.0.0.1:{port}"],
                            cwd=isolated, capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: the MLflow tracking server http://127.0.0.1:{port} does not answer")
    assert "start it" in line
    assert not (isolated / "mlruns").exists()  # no study was created


def test_a_wrong_database_password_is_a_clear_error_that_hides_the_password(
        postgres: str, isolated: Path, cifar_slice: Path) -> None:
    wrong = postgres.replace(PASSWORD, "not-the-Pw-9") + "/optuna"
    result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "1", "--epochs",
                             "1", "--data", str(cifar_slice), "--storage", wrong], cwd=isolated,
                            capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot open the Optuna storage postgresql://cifar:***@127.0.0.1")
    assert "not-the-Pw-9" not in result.stdout + result.stderr


def test_a_tracking_server_that_goes_away_mid_sweep_loses_nothing(isolated: Path, cifar_slice: Path) -> None:
    port = free_port()
    backend = f"sqlite:///{isolated}/server.db"
    server = start_mlflow_server(backend, isolated, port)
    sweep = subprocess.Popen([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "2", "--epochs",
                              "2", "--data", str(cifar_slice), "--tracking-uri", f"http://127.0.0.1:{port}"],
                             cwd=isolated, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert sweep.stdout is not None
        for line in sweep.stdout:
            if line.startswith("trial 0 started"):
                break
        stop(server)  # gone while trial 0 trains and logs
        time.sleep(5)
        server = start_mlflow_server(backend, isolated, port)  # back, same store, same address
        out, err = sweep.communicate(timeout=900)
    finally:
        stop(server)
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, err
    trials = optuna.load_study(study_name="lr_dropout", storage=open_storage(str(isolated / "mlruns" /
                                                                              "optuna.journal"))).get_trials()
    assert len(trials) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    client = MlflowClient(backend)  # what the server stored, read from its database
    (experiment,) = [e for e in client.search_experiments() if e.name == "lr_dropout"]
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1]
    for child in children:  # every epoch of every trial is there, the outage notwithstanding
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert steps == list(range(len(steps))) and len(steps) == trials[int(
            child.data.tags["trial_number"])].user_attrs["epochs_run"]


def test_a_tracking_server_behind_basic_auth_takes_credentials_from_the_uri_or_mlflow_s_variables(
        isolated: Path, cifar_slice: Path) -> None:
    from cifar_exp import track
    from cifar_exp.config import UserError

    port, admin = free_port(), "Adm1n-pw-4242-long"
    config = isolated / "auth.ini"  # MLflow's basic-auth app, its users in a file of this test
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{isolated}/auth.db\n"
                      f"admin_username = admin\nadmin_password = {admin}\n"
                      f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = start_mlflow_server(f"sqlite:///{isolated}/server.db", isolated, port, "--app-name", "basic-auth",
                                 env={"MLFLOW_AUTH_CONFIG_PATH": str(config),
                                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret"})
    base = f"http://127.0.0.1:{port}"
    work = isolated / "work"
    work.mkdir()
    try:
        def sweep(uri: str, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "1",
                                   "--epochs", "1", "--data", str(cifar_slice), "--tracking-uri", uri], cwd=work,
                                  capture_output=True, text=True, timeout=600, env=clean_env(**env))

        refused = sweep(f"http://admin:wrong-pw@127.0.0.1:{port}")
        assert refused.returncode == 2, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert f"the MLflow tracking server {base} refused this user" in line and "MLFLOW_TRACKING_USERNAME" in line
        assert "wrong-pw" not in refused.stdout + refused.stderr and not (work / "mlruns").exists()

        done = sweep(f"http://admin:{admin}@127.0.0.1:{port}")  # credentials in the URI
        assert done.returncode == 0, done.stderr[-3000:]
        assert admin not in done.stdout + done.stderr
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        client = MlflowClient(base)
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin)  # MLflow's variables
        try:
            track.server.check_server(base)
            (experiment,) = [e for e in client.search_experiments() if e.name == "lr_dropout"]
            (child,) = [r for r in client.search_runs([experiment.experiment_id])
                        if "mlflow.parentRunId" in r.data.tags]
            assert child.info.status == "FINISHED"
            assert admin not in str(child.data.params) + str(child.data.tags)
            os.environ["MLFLOW_TRACKING_PASSWORD"] = "wrong-pw"
            with pytest.raises(UserError, match="refused this user"):
                track.server.check_server(base)
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
            os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    finally:
        stop(server)


def test_the_database_password_can_stay_out_of_the_command_line(postgres: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # or ~/.pgpass: libpq reads both, `ps` shows neither
    url = postgres.replace(f":{PASSWORD}@", "@") + "/optuna"
    assert PASSWORD not in url
    study = optuna.create_study(study_name="no-password-in-argv", storage=open_storage(url))
    assert study.study_name in optuna.get_all_study_names(open_storage(url))
