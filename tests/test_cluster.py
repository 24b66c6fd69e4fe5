"""Sweeps on clusters (``cifar_exp.cluster``, ``cifar-exp launch``), fast: the Slurm batch script
run for real under bash (a fake ``scontrol`` and a fake sweep, SIGTERM sent as Slurm sends it),
the Kubernetes Job checked against the real schemas of the Kubernetes API (the
``kubernetes-validate`` package, offline), where a run records it ran, and the command's
refusals."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cifar_exp.cluster import Exit, check_gpus, devices, k8s, placement, slurm
from tests.conftest import in_process

SLURM = slurm.ArrayJob("lr_dropout", "postgresql://optuna@db/optuna", "http://mlflow:5000", "/shared/ckpt",
                       tasks=3, at_once=2, gpus=1, cpus=4, time="4:00:00", workdir="/home/me", logs="/home/me/logs",
                       python="/opt/venv/bin/python")
K8S = k8s.IndexedJob("lr_dropout", "postgresql://optuna:$(PGPASSWORD)@db/optuna", "http://mlflow:5000",
                     "/shared/ckpt", completions=4, parallelism=2, image="registry.example/cifar-exp:1",
                     queue="gpu-queue", secret="optuna-db", checkpoint_claim="ckpt")


def test_placement_names_the_slurm_task_or_the_pod_and_the_gpus() -> None:
    tags = placement({"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "1",
                      "CUDA_VISIBLE_DEVICES": "2"})
    assert tags["slurm_array_job_id"] == "40" and tags["slurm_array_task_id"] == "1" and tags["slurm_job_id"] == "41"
    assert tags["cuda_visible_devices"] == "2" and tags["host"]
    pod = placement({"JOB_COMPLETION_INDEX": "3", "HOSTNAME": "cifar-exp-lr-dropout-3-x7k2p"})
    assert pod["k8s_completion_index"] == "3" and pod["k8s_pod"] == "cifar-exp-lr-dropout-3-x7k2p"
    assert "k8s_pod" not in placement({}) and placement({})["cuda_visible_devices"] == ""


def test_the_slurm_script_is_a_job_array_of_one_worker_each() -> None:
    text = slurm.script(SLURM)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0  # bash reads it
    options = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert {"--array=0-2%2", "--gres=gpu:1", "--requeue", "--time=4:00:00", "--job-name=cifar-exp-lr_dropout",
            "--output=/home/me/logs/%x-%A_%a.out", f"--signal=B:TERM@{slurm.SIGNAL_LEAD_SECONDS}"} <= set(options)
    assert ("/opt/venv/bin/python -m cifar_exp sweep lr_dropout --workers 1 --storage postgresql://optuna@db/optuna "
            "--tracking-uri http://mlflow:5000 --checkpoint-dir /shared/ckpt &") in text


def _fake_task(tmp_path: Path, exit_on_term: int) -> tuple[subprocess.Popen, Path, Path]:
    """The script of a job whose "python" is a shell script that says it started, waits, and
    exits ``exit_on_term`` on SIGTERM; ``scontrol`` is a fake that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started, requeued = tmp_path / "started", tmp_path / "requeued"
    fake_python = bin_dir / "python"
    fake_python.write_text(f"#!/bin/bash\ntrap 'exit {exit_on_term}' TERM\ntouch {started}\n"
                           "while true; do sleep 0.05; done\n")
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" > {requeued}\n')
    for tool in (fake_python, scontrol):
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    job = slurm.ArrayJob("lr_dropout", "postgresql://db/o", "http://m:5000", "/shared", tasks=2, at_once=2, gpus=0,
                         cpus=1, time="10", workdir=str(tmp_path), logs=str(tmp_path), python=str(fake_python))
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.script(job))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "1"}
    task = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and task.poll() is None, "the sweep never started"
        time.sleep(0.02)
    return task, started, requeued


def test_sigterm_reaches_the_sweep_and_an_interrupted_task_requeues_itself(tmp_path: Path) -> None:
    task, _, requeued = _fake_task(tmp_path, int(Exit.INTERRUPTED))
    task.send_signal(signal.SIGTERM)  # as Slurm signals the batch shell (--signal=B:TERM, scancel --batch)
    assert task.wait(timeout=30) == Exit.INTERRUPTED
    assert requeued.read_text().split() == ["requeue", "77_1"]


def test_a_task_whose_sweep_ends_otherwise_is_not_requeued(tmp_path: Path) -> None:
    task, _, requeued = _fake_task(tmp_path, int(Exit.FAILED))
    task.send_signal(signal.SIGTERM)
    assert task.wait(timeout=30) == Exit.FAILED and not requeued.exists()


def test_the_indexed_job_is_valid_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    manifest = k8s.manifest(K8S)
    for version in ("1.31.0", "1.33.0"):  # podReplacementPolicy and backoffLimitPerIndex are GA from 1.31 (beta 1.29)
        kubernetes_validate.validate(manifest, version, strict=True)
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == 2 and spec["completions"] == 4
    assert spec["podReplacementPolicy"] == "Failed" and spec["backoffLimitPerIndex"] == 3
    rules = {(r["action"], tuple(r["onExitCodes"]["values"]) if "onExitCodes" in r else "disruption")
             for r in spec["podFailurePolicy"]["rules"]}
    assert rules == {("FailJob", (2,)), ("FailIndex", (1,)), ("Ignore", (130,)), ("Ignore", "disruption")}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["restartPolicy"] == "Never" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"][:5] == ["cifar-exp", "sweep", "lr_dropout", "--workers", "1"]
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert container["envFrom"] == [{"secretRef": {"name": "optuna-db"}}]
    assert container["volumeMounts"][0]["mountPath"] == "/shared/ckpt"


def test_a_job_that_breaks_the_schema_is_caught_by_the_validation() -> None:
    """The validation above can fail: a Job with a misspelt field is refused."""
    import kubernetes_validate

    manifest = k8s.manifest(K8S)
    manifest["spec"]["parallelsm"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_a_job_name_follows_kubernetes_naming() -> None:
    assert k8s.IndexedJob("/x/My_Sweep.yaml", "", "", "/c", 1, 1, "i").name == "cifar-exp-my-sweep"


STORES = ["--storage", "postgresql://optuna@db/optuna", "--tracking-uri", "http://mlflow:5000",
          "--checkpoint-dir", "/shared/ckpt"]


def test_launch_writes_the_script_and_the_manifest_readable_by_their_owner_only(isolated: Path) -> None:
    code, out, err = in_process(isolated, "launch", "slurm", "lr_dropout", *STORES, "--tasks", "3")
    assert code == 0, err
    script = isolated / "mlruns" / "launch" / "cifar-exp-lr_dropout.sbatch"
    assert "#SBATCH --array=0-2%3" in script.read_text() and stat.S_IMODE(script.stat().st_mode) == 0o600
    assert "sbatch mlruns/launch/cifar-exp-lr_dropout.sbatch" in out and "squeue" in out
    code, out, err = in_process(isolated, "launch", "k8s", "lr_dropout", *STORES, "--image", "img:1", "--out",
                                "job.yaml")
    assert code == 0, err
    manifest = yaml.safe_load((isolated / "job.yaml").read_text())
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == "img:1"
    assert "kubectl apply -f job.yaml" in out


@pytest.mark.parametrize("argv, message", [
    (["slurm", "lr_dropout", "--storage", "mlruns/optuna.journal", "--tracking-uri", "http://m:5000",
      "--checkpoint-dir", "/c"], "a file on this machine, which tasks on other nodes cannot share"),
    (["slurm", "lr_dropout", "--storage", "sqlite:///mlruns/optuna.db", "--tracking-uri", "http://m:5000",
      "--checkpoint-dir", "/c", "--submit"], "a file on this machine, which tasks on other nodes cannot share"),
    (["slurm", "lr_dropout", "--tracking-uri", "http://m:5000", "--checkpoint-dir", "/c", "--submit"],
     "the following arguments are required: --storage"),
    (["slurm", "no_such_sweep", *STORES, "--submit"], "unknown sweep 'no_such_sweep'"),
    (["slurm", "lr_dropout", "--storage", "postgresql://db/o", "--tracking-uri", "sqlite:///mlruns/mlflow.db",
      "--checkpoint-dir", "/c"], "a store on this machine: pass the MLflow server"),
    (["slurm", "lr_dropout", *STORES[:4], "--checkpoint-dir", "ckpt"], "give the absolute path"),
    (["slurm", "lr_dropout", *STORES, "--time", "soon"], "--time soon: give Slurm's format"),
    (["k8s", "lr_dropout", *STORES], "give --image"),
    (["k8s", "no_such_sweep", *STORES, "--image", "i"], "unknown sweep 'no_such_sweep'"),
])
def test_launch_refuses_what_a_cluster_cannot_run_in_one_line_and_writes_nothing(
        isolated: Path, argv: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cifar_exp", "launch", *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert message in line, line
    assert not (isolated / "mlruns").exists()


def test_launch_help_runs_as_a_command() -> None:
    done = subprocess.run([sys.executable, "-m", "cifar_exp", "launch", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--checkpoint-dir" in done.stdout


@pytest.mark.parametrize("served, says", [("0.0.1", True), (None, False)])
def test_a_tracking_server_of_another_mlflow_version_is_named_in_one_line(served: str | None, says: bool) -> None:
    """What ``/version`` answers, from a real HTTP server: another version than this client's is
    one line naming both; the client's own version, nothing."""
    import http.server
    import threading

    import mlflow

    from cifar_exp import track

    answer = (served or mlflow.__version__).encode()

    class Version(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/version" else 404)
            self.end_headers()
            self.wfile.write(answer if self.path == "/version" else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Version)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        line = track.server.version_mismatch(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert ("runs MLflow 0.0.1 and this process" in line and "\n" not in line) if says else line == ""


def test_a_schedulers_gpus_win_and_workers_sharing_a_gpu_split_its_memory() -> None:
    # no scheduler: --gpus names the devices; two workers on GPU 0, one on GPU 1
    assert devices(0, 3, ("0", "1"), {}) == {"CUDA_VISIBLE_DEVICES": "0", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"}
    assert devices(1, 3, ("0", "1"), {}) == {"CUDA_VISIBLE_DEVICES": "1"}
    # Slurm gave this task GPUs 4 and 6: --gpus 1 is the second of them, never GPU 1 of the node
    slurm_env = {"CUDA_VISIBLE_DEVICES": "4,6"}
    assert devices(0, 1, ("1",), slurm_env) == {"CUDA_VISIBLE_DEVICES": "6"}
    assert devices(0, 1, (), slurm_env) == {}  # no --gpus: the scheduler's setting stands
    assert devices(0, 2, (), slurm_env) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"}  # two workers, one card
    assert devices(0, 2, (), {**slurm_env, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3"}) == {}  # the user's own
    check_gpus(("0", "1"), slurm_env)
    with pytest.raises(ValueError, match=r"--gpus 2: this process may use 2 GPU\(s\) .*indices below 2"):
        check_gpus(("2",), slurm_env)
    check_gpus(("5",), {})  # no scheduler: any index


def test_checkpoints_go_to_the_checkpoint_dir_when_given(tmp_path: Path) -> None:
    from cifar_exp.sweep import sidecar

    storage = "postgresql://optuna@db/optuna"
    beside = sidecar.checkpoint(storage, "demo", 3)
    shared = sidecar.checkpoint(storage, "demo", 3, str(tmp_path / "shared"))
    assert beside.parent.parent.parent == Path("mlruns/checkpoints")
    assert shared.parent.parent.parent == tmp_path / "shared" and shared.name == beside.name == "3.npz"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"x")
    assert sidecar.drop_checkpoints(storage, "demo", keep=set(), root=str(tmp_path / "shared")) == [shared]


def test_the_sweep_refuses_gpus_beyond_the_schedulers_and_a_missing_checkpoint_dir(isolated: Path) -> None:
    code, _, err = in_process(isolated, "sweep", "lr_dropout", "--gpus", "1", env={"CUDA_VISIBLE_DEVICES": "3"})
    assert code == 2 and "give indices below 1" in err and len(err.strip().splitlines()) == 1
    code, _, err = in_process(isolated, "sweep", "lr_dropout", "--checkpoint-dir", "nowhere")
    assert code == 2 and "--checkpoint-dir nowhere: no such folder" in err
    assert not (isolated / "mlruns").exists()
