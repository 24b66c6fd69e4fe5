"""The main job for real: ``python -m cifar_exp.sweep lr_dropout`` on a slice of the real
CIFAR-10 (JPEG copy), checked through the MLflow and Optuna APIs."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cifar_exp import data
from cifar_exp.config.records import trial_seed
from cifar_exp.sweep.storage import open_storage
from tests.conftest import ROOT, in_process

pytestmark = pytest.mark.slow
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the budget's trials (4 epochs: hyperband may prune)
TEST_IMAGES = 100  # the slice: 10 test images per class


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without MLFLOW_TRACKING_URI (which ``mlflow.set_tracking_uri`` exports in
    the test process), so that a command uses its own folder's store."""
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **extra}


def run_sweep(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=900, env=clean_env(**(env or {})))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def runs(cwd: Path, experiment: str = "lr_dropout") -> tuple[list, list]:
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns/mlflow.db")
    exp = MlflowClient().get_experiment_by_name(experiment)
    all_runs = MlflowClient().search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


PHASES = ("claim_seconds", "build_seconds", "compile_seconds", "fit_seconds", "predict_seconds", "artifacts_seconds",
          "model_seconds")


def study(cwd: Path, name: str = "lr_dropout") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(cwd / "mlruns" / "optuna.journal")))


def test_lr_dropout_runs_tracks_and_resumes(isolated: Path, cifar_slice: Path) -> None:
    done = run_sweep(isolated, "lr_dropout", "--trials", "3", "--epochs", "2", "--data", str(cifar_slice),
                     env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"})  # trials last seconds here
    out = done.stdout
    # A quiet terminal: our lines only, one per epoch without a terminal; the libraries' in the log
    noise = ("oneDNN", "cuda", "absl", " INFO mlflow", "WARNING", "Traceback", "\r", "\033")
    assert not [line for line in (out + done.stderr).splitlines() if any(n in line for n in noise)], out + done.stderr
    assert "library log lines (TensorFlow, MLflow, Optuna): mlruns/logs/lr_dropout.log" in out
    assert "live view: cifar-exp dashboard lr_dropout\n" in out
    assert sum(line.startswith("  trial ") and " epoch " in line for line in out.splitlines()) == 6
    log = (isolated / "mlruns" / "logs" / "lr_dropout.log").read_text()
    assert "mlflow" in log and "Started monitoring system metrics" in log
    # the UI that refuses other pages' state changes, not plain mlflow ui
    assert out.rstrip().endswith("open the MLflow UI: cifar-exp ui lr_dropout"), out[-500:]

    parents, children = runs(isolated)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    client = MlflowClient()
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["state"] == "COMPLETE"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [0, 1]
        assert len(client.get_metric_history(child.info.run_id, "learning_rate")) == 2
        assert {"learning_rate", "dropout", "head_dropout", "lr_schedule", "seed", "batch_size", "filters"} \
            <= set(child.data.params)
        assert "test_accuracy" in child.data.metrics and "test_recall_cat" in child.data.metrics
        assert child.data.metrics["param_count"] > 0 and child.data.metrics["images_per_second"] > 0
        # once, with the first epoch: the worker's seconds from claiming the trial to its first step
        first = client.get_metric_history(child.info.run_id, "time/first_step_seconds")
        assert [m.step for m in first] == [0] and 0 < first[0].value < history[0].timestamp / 1000 - \
            child.info.start_time / 1000 + 5  # claiming precedes the run
        # provenance: this checkout's commit, and the tracking libraries' versions
        assert child.data.tags["git_commit"] == head and child.data.tags["git_dirty"] in ("true", "false")
        assert child.data.tags["optuna_version"] == optuna.__version__
        # the machine while it trained, sampled by MLflow's system metrics monitor
        assert child.data.metrics["system/system_memory_usage_megabytes"] > 0
        assert 0 <= child.data.metrics["system/cpu_utilization_percentage"] <= 100

    # The confusion matrix counts every test image once; the model loads and predicts.
    child = children[0]
    folder = Path(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, dst_path=str(isolated / "a")))
    rows = list(csv.reader((folder / "confusion_matrix.csv").open()))
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == TEST_IMAGES
    assert "Total params" in (folder / "model_summary.txt").read_text()
    assert (folder / "confused_pairs.csv").read_text().startswith("pair,total,a_as_b,b_as_a")
    model = mlflow.keras.load_model(child.data.tags["model_uri"])
    images = data.load(str(cifar_slice)).x_test[:5]
    probs = model.predict(images, verbose=0)
    assert probs.shape == (5, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)

    # One worker, one structure: the first trial compiles, the next two run its programs; every
    # trial logs its seconds by phase, and the Optuna trial carries them for the ledger.
    by_number = sorted(children, key=lambda c: int(c.data.tags["trial_number"]))
    assert [c.data.tags["compiled"] for c in by_number] == ["new", "reused", "reused"]
    for child in children:
        # the bookkeeping under time/, a section of its own below the model's metrics in the UI
        assert {f"time/{p}" for p in PHASES} <= set(child.data.metrics) and child.data.metrics["time/fit_seconds"] > 0
        assert not set(PHASES) & set(child.data.metrics)
    assert [c.data.metrics["time/compile_seconds"] for c in by_number][1:] == [0.0, 0.0]
    assert by_number[0].data.metrics["time/compile_seconds"] > 0

    # names that sort as the trials do; the data each trained on as a dataset input
    assert [c.info.run_name for c in by_number] == ["trial-000", "trial-001", "trial-002"]
    checksum = data.load(str(cifar_slice)).checksum
    for child in children:
        (used,) = child.inputs.dataset_inputs
        assert used.dataset.name == "cifar10 (cifar10-slice.zip)" and used.dataset.digest == checksum[:36]
        profile = json.loads(used.dataset.profile)  # the slice's 400 training images, split
        assert profile["train_images"] + profile["validation_images"] == 400 and profile["test_images"] == TEST_IMAGES
        assert {t.key: t.value for t in used.tags} == {"mlflow.data.context": "training"}
    # the UI's saved view of the trials, best first, with the objective's and the searched columns
    view = json.loads(client.get_experiment(parent.info.experiment_id).tags["mlflow.sharedViewState.cifar-exp-trials"])
    assert view["orderByKey"] == "metrics.`val_accuracy`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:2] == ["metrics.`val_accuracy`", "metrics.`test_accuracy`"]
    assert "params.`learning_rate`" in view["selectedColumns"] and "tags.`state`" in view["selectedColumns"]

    trials = study(isolated).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.user_attrs["compiled"] for t in trials] == ["new", "reused", "reused"]
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {c.info.run_id for c in children}
    assert [t.user_attrs["seed"] for t in trials] == [trial_seed(0, n) for n in range(3)]
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_finished"] == "3"
    assert "best_val_accuracy" in parent.data.metrics

    # The same command with a larger budget resumes, here with two workers, each given its own
    # GPU by --gpus: two more trials under the same parent.
    resumed = run_sweep(isolated, "lr_dropout", "--trials", "5", "--epochs", "2", "--data", str(cifar_slice),
                        "--workers", "2", "--gpus", "0,1").stdout
    assert "3 trials finished before" in resumed and "[4 of 5]" in resumed
    assert "no best yet" not in resumed and " 0 complete" not in resumed  # it counts the 3 it had
    parents, children = runs(isolated)
    assert len(parents) == 1 and parents[0].info.run_id == parent.info.run_id
    assert len(children) == 5 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    later = [c for c in children if int(c.data.tags["trial_number"]) >= 3]
    for child in later:  # worker i sees GPU i (here, on the CPU, only the environment says so)
        assert child.data.tags["cuda_visible_devices"] == str(int(child.data.tags["worker"]) % 2)
    resumed_workers = len({c.data.tags["worker"] for c in later})  # 2, unless one worker took both
    assert [t.number for t in study(isolated).get_trials()] == [0, 1, 2, 3, 4]
    # ... but not with other epochs: its trials would not be comparable (one line, exit 2)
    refused = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--trials", "6", "--epochs", "3",
                              "--data", str(cifar_slice)], cwd=isolated, capture_output=True, text=True, timeout=600,
                             env=clean_env())
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "was started with epochs 2, not 3" in refused.stderr and "pass --epochs 2" in refused.stderr
    assert len(study(isolated).get_trials()) == 5
    trials_csv = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="trials.csv",
                                                          dst_path=str(isolated / "b")))
    assert len(list(csv.DictReader(trials_csv.open()))) == 5
    # The study's report in the parent run: Optuna's plots, the tables and the cost ledger ...
    report = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, dst_path=str(isolated / "c")))
    names = {path.name for path in report.iterdir()}
    assert {"report.html", "trials.html", "cost.json", "optimization_history.png", "param_importances.png",
            "parallel_coordinate.png", "slice.png", "contour.png", "intermediate_values.png"} <= names
    cost = json.loads((report / "cost.json").read_text())
    assert cost["trials_complete"] == 5 and cost["seconds_complete"] > 0
    assert cost["seconds_total"] == pytest.approx(sum(float(row["seconds"]) for row in csv.DictReader(
        trials_csv.open())))
    # ... which the report command rebuilds from storage alone.
    # (The report and compare commands run in this process: ``in_process``.)
    stores = ("--storage", str(isolated / "mlruns" / "optuna.journal"),
              "--tracking-uri", f"sqlite:///{isolated}/mlruns/mlflow.db")
    code, out, err = in_process(isolated, "report", "lr_dropout", *stores)
    assert code == 0, err
    assert f"study 'lr_dropout': 5 trials; report rebuilt in parent run {parent.info.run_id}" in out
    code, out, err = in_process(isolated, "compare", "lr_dropout", "--top", "3", *stores)
    assert code == 0, err
    header, *table = out.splitlines()[:4]
    assert header.split()[:4] == ["rank", "trial", "val_accuracy", "test_accuracy"]
    values = [float(line.split()[2]) for line in table]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(study(isolated).best_value, abs=5e-5)
    assert (isolated / "mlruns" / "lr_dropout-top-3.png").stat().st_size > 10_000
    check_ui_serves_the_store(isolated, parent.info.experiment_id, {c.info.run_id for c in children})
    metrics = MlflowClient().get_run(parent.info.run_id).data.metrics
    assert metrics["cost_trials_complete"] == 5
    assert metrics["cost_seconds_total"] == pytest.approx(cost["seconds_total"])
    # each worker of the resumed command compiled its own first program
    assert (cost["compiled_new"], cost["compiled_reused"], cost["compiled_cache"]) == \
        (1 + resumed_workers, 4 - resumed_workers, 0)
    assert cost["compile_seconds"] == pytest.approx(sum(t.user_attrs["compile_seconds"] for t in
                                                        study(isolated).get_trials()))


def check_ui_serves_the_store(cwd: Path, experiment_id: str, child_ids: set[str]) -> None:
    """``python -m cifar_exp ui`` on a free loopback port: runs, params, metrics and artifacts come
    back over MLflow's REST API; then it is stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "cifar_exp", "ui", "lr_dropout", "--port", str(port)], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                          start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert ui.stdout is not None
        assert ui.stdout.readline().strip() == f"MLflow UI on sqlite:///mlruns/mlflow.db: {base}"
        printed = ui.stdout.readline().strip()
        assert printed == f"experiment lr_dropout: {base}/#/experiments/{experiment_id}/runs" \
                          "?workflowType=machine_learning&viewStateShareKey=cifar-exp-trials"
        deadline = time.time() + 300  # the server's start, polled; slower while other work runs
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.time() > deadline or ui.poll() is not None:
                    raise
                time.sleep(1)

        def api(path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                             data=json.dumps(body).encode() if body else None,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        found = api("runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
        children = [r for r in found if r["info"]["run_id"] in child_ids]
        assert len(found) == len(child_ids) + 1 and len(children) == len(child_ids)
        for run in children:
            assert {"learning_rate", "dropout", "seed"} <= {p["key"] for p in run["data"]["params"]}
            assert {"val_accuracy", "test_accuracy"} <= {m["key"] for m in run["data"]["metrics"]}
        files = api(f"artifacts/list?run_id={children[0]['info']['run_id']}")["files"]
        assert {"confusion_matrix.png", "sweep.yaml"} <= {f["path"] for f in files}
        # DNS rebinding: a page on another name must not reach the store through this server
        evil = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=5",
                                      headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(evil, timeout=30)
        assert refused.value.code == 403
        # Another local program's page (another port) must not change the store; the UI's own may.
        body = json.dumps({"name": "cross-origin"}).encode()
        for origin, allowed in ((f"http://127.0.0.1:{port + 1}", False), (base, True)):
            forged = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/create", data=body, method="POST",
                                            headers={"Origin": origin, "Content-Type": "application/json"})
            if allowed:
                with urllib.request.urlopen(forged, timeout=30) as response:
                    assert response.status == 200
            else:
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(forged, timeout=30)
                assert refused.value.code == 403, origin
        check_runs_page(printed.split(": ", 1)[1], len(child_ids), cwd / "runs.png")
        check_compare_page(base, experiment_id, children[:2], cwd / "compare-runs.png")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        out, err = ui.communicate(timeout=60)
    # The terminal: our two lines, and MLflow's middleware stating the hosts and origins it allows;
    # no deprecation warnings, no Uvicorn start-up or per-request lines
    assert out.strip() == "", out
    assert err.strip() == f"[MLflow] Security middleware enabled. Allowed hosts: 127.0.0.1:{port}, localhost:{port}. " \
                          f"CORS origins: http://127.0.0.1:{port}, http://localhost:{port}.", err


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1200"]


def chromium(url: str, *args: str, profile: Path) -> str:
    """Run headless Chromium on ``url`` with ``args``; its stdout. The flags keep it off the network
    (this machine has none) and give it a fresh profile."""
    binary = shutil.which("chromium")
    assert binary, "no chromium on PATH: `apt-get install chromium` (.ci/run does)"
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def page_lines(url: str, budget: int, profile: Path) -> list[str]:
    """The lines of text ``url`` shows in headless Chromium after ``budget`` virtual milliseconds."""
    dom = chromium(url, f"--virtual-time-budget={budget}", "--dump-dom", profile=profile)
    text = html.unescape(re.sub(r"<[^>]+>", "\n", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)))
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_runs_page(url: str, trials: int, screenshot: Path) -> None:
    """The address ``cifar-exp ui`` prints opens the experiment's runs table (MLflow's page for
    model training, not its GenAI overview of traces) on the sweep's saved view: its ``trials``,
    each a row of its own (not one collapsed parent row), best first, with the objective's column;
    a screenshot is saved."""
    for budget in (20_000, 60_000):  # virtual milliseconds for the page's scripts and API calls
        lines = page_lines(url, budget, screenshot.parent / "chrome")
        if "matching runs" in lines and "val_accuracy" in lines:
            break
    assert lines[0].startswith("Runs - Experiment"), lines[:5]  # the page's title
    assert "Run Name" in lines and "val_accuracy" in lines and "learning_rate" in lines, lines
    assert "lr_dropout-study" not in lines, lines  # the trials themselves, not their parent
    shown = [line for line in lines if line.startswith("trial-")]
    assert len(shown) == trials, lines
    assert "Sessions" not in lines and "Judges" not in lines, lines  # GenAI's navigation
    assert lines[lines.index("matching runs") - 1] == str(trials), lines
    chromium(url, f"--virtual-time-budget={budget}", f"--screenshot={screenshot}", profile=screenshot.parent / "chrome")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def check_compare_page(base: str, experiment_id: str, runs: list[dict], screenshot: Path) -> None:
    """The MLflow UI's run-comparison page, rendered by a real headless Chromium, shows both runs
    (id and name) and every one of their parameters with its value; a screenshot is saved."""
    ids = ",".join(f'"{r["info"]["run_id"]}"' for r in runs)
    url = f"{base}/#/compare-runs?runs=" + urllib.parse.quote(f"[{ids}]") + "&experiments=" + \
        urllib.parse.quote(f'["{experiment_id}"]')
    expected = {r["info"]["run_id"] for r in runs} | {r["info"]["run_name"] for r in runs}
    for run in runs:
        expected |= {p["key"] for p in run["data"]["params"]} | {p["value"] for p in run["data"]["params"]}
    for budget in (20_000, 60_000):  # virtual milliseconds for the page's scripts and API calls
        dom = chromium(url, f"--virtual-time-budget={budget}", "--dump-dom", profile=screenshot.parent / "chrome")
        text = html.unescape(re.sub(r"<[^>]+>", "\n", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)))
        shown = {line.strip() for line in text.splitlines()}
        if expected <= shown:
            break
    assert "Comparing 2 Runs" in text and expected <= shown, sorted(expected - shown)
    chromium(url, f"--virtual-time-budget={budget}", f"--screenshot={screenshot}", profile=screenshot.parent / "chrome")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def test_failing_trials_fail_alone(isolated: Path, cifar_slice: Path) -> None:
    # Trial 1 raises inside its worker; trial 2's worker process dies mid-trial; trial 4 runs out of memory.
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")]),
           "CIFAR_EXP_FAULT_RAISE": str(trial_seed(0, 1)), "CIFAR_EXP_FAULT_DIE": str(trial_seed(0, 2)),
           "CIFAR_EXP_FAULT_OOM": str(trial_seed(0, 4))}
    # Run as `cifar-exp sweep` (cli.main) in a process that says at the end which heavy modules it
    # imported: the sweep command checks input and follows its workers; Keras and its backend live
    # in the workers only (through failures, a death and a retry too), so its memory and start-up stay small.
    script = ("import sys; from cifar_exp.cli import main; code = main(sys.argv[1:]); "
              "print('heavy:', sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules)); "
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "sweep", "lr_dropout", "--trials", "4", "--epochs", "1",
                           "--data", str(cifar_slice)], cwd=isolated, capture_output=True, text=True, timeout=900,
                          env=clean_env(**env))
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.rstrip().endswith("heavy: []"), out
    assert "trial 1 FAIL: RuntimeError: injected fault" in out and "worker process died (exit code 9)" in out

    # The dead worker's trial is retried once, with its parameters, as trial 3; the failures that
    # raised count against the budget, the died-and-retried one does not: 4 counted trials.
    states = {t.number: t for t in study(isolated).get_trials()}
    assert [states[n].state for n in range(5)] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                                  TrialState.COMPLETE, TrialState.FAIL]
    assert states[1].user_attrs["fail_reason"].startswith("RuntimeError: injected fault")
    assert states[4].user_attrs["fail_reason"].startswith("MemoryError: Unable to allocate 64.0 TiB")
    assert states[2].user_attrs["fail_reason"] == "worker process died (exit code 9)"
    assert states[3].user_attrs["retry_of"] == 2 and states[3].params == states[2].params
    _, children = runs(isolated)
    by_trial = {int(c.data.tags["trial_number"]): c for c in children}
    assert by_trial[1].info.status == "FAILED" and "injected fault" in by_trial[1].data.tags["fail_reason"]
    assert by_trial[2].info.status == "FAILED" and "died" in by_trial[2].data.tags["fail_reason"]
    assert by_trial[4].info.status == "FAILED" and "MemoryError" in by_trial[4].data.tags["fail_reason"]
    assert by_trial[0].info.status == by_trial[3].info.status == "FINISHED"


def test_too_many_consecutive_failures_stop_the_sweep(isolated: Path, cifar_slice: Path) -> None:
    sweep_file = isolated / "fragile.yaml"
    sweep_file.write_text((ROOT / "sweeps" / "lr_dropout.yaml").read_text() + "max_consecutive_failures: 2\n")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")]),
           "CIFAR_EXP_FAULT_RAISE": ",".join(str(trial_seed(0, n)) for n in range(6))}
    result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", str(sweep_file), "--trials", "6",
                             "--epochs", "1", "--data", str(cifar_slice)], cwd=isolated, capture_output=True,
                            text=True, timeout=600, env=clean_env(**env))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stopped after 2 consecutive failed trials" in result.stderr
    trials = study(isolated, "fragile").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    parents, _ = runs(isolated, "fragile")
    assert parents[0].info.status == "FINISHED"


def test_a_full_disk_while_writing_artifacts_fails_trials_alone(isolated: Path, cifar_slice: Path) -> None:
    # The artifact folder is a 3 MB tmpfs of its own (a private mount namespace: no root needed):
    # trial 0's artifacts and model (1.85 MB: 0.3 MB of files, a 1.5 MB model) fit, trial 1's do
    # not, and the disk is full for real (ENOSPC). The study's report is first written at the end
    # (into the full disk: it fails quietly). What was on it is copied out before the namespace ends.
    script = (f"mkdir -p mlruns/1 && mount -t tmpfs -o size=3m tmpfs mlruns/1 && "
              f"{sys.executable} -m cifar_exp.sweep lr_dropout --trials 3 --epochs 1 --data {cifar_slice}; "
              f"rc=$?; cp -a mlruns/1 kept; exit $rc")
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=isolated,
                            capture_output=True, text=True, timeout=900, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    trials = study(isolated).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    for trial in trials[1:]:
        assert "No space left on device" in trial.user_attrs["fail_reason"]
    _, children = runs(isolated)
    by_trial = {int(c.data.tags["trial_number"]): c for c in children}
    assert [by_trial[n].info.status for n in range(3)] == ["FINISHED", "FAILED", "FAILED"]
    # nothing completed is lost: trial 0's artifacts and model are whole
    kept = isolated / "kept"
    artifacts = kept / by_trial[0].info.run_id / "artifacts"
    assert {"confusion_matrix.csv", "sweep.yaml", "model_summary.txt"} <= {p.name for p in artifacts.iterdir()}
    # (trial 1's model file may be there too, whole, from before the write that failed)
    model = kept / "models" / by_trial[0].data.tags["model_uri"].removeprefix("models:/") / "artifacts" / "data" / \
        "model.keras"
    import keras

    assert keras.saving.load_model(model, safe_mode=True).count_params() == by_trial[0].data.metrics["param_count"]


def test_a_diverging_trial_fails_with_the_reason_and_the_sweep_goes_on(isolated: Path, cifar_slice: Path) -> None:
    out = run_sweep(isolated, str(ROOT / "tests" / "sweeps" / "diverge.yaml"), "--data", str(cifar_slice),
                    env={"PYTHONPATH": str(ROOT)}).stdout  # the NaN hypermodel is importable
    assert "trial 0 FAIL: Diverged: loss is nan at epoch 0" in out and "trial 1 FAIL" in out
    trials = study(isolated, "diverge").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    _, children = runs(isolated, "diverge")
    assert {c.info.status for c in children} == {"FAILED"}
    assert all(c.data.tags["fail_reason"].startswith("Diverged: loss is nan") for c in children)


def test_a_trial_past_trial_timeout_fails_alone_with_that_reason_and_the_sweep_goes_on(isolated: Path,
                                                                                       cifar_slice: Path) -> None:
    out = run_sweep(isolated, str(ROOT / "tests" / "sweeps" / "trial_timeout.yaml"), "--data", str(cifar_slice)).stdout
    assert "trial 0 FAIL: TrialTimeout: ran past trial_timeout (1 s)" in out
    assert "trial 1 FAIL: TrialTimeout: ran past trial_timeout (1 s)" in out
    trials = study(isolated, "trial_timeout").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]  # not retried: it would only time out again
    assert all(len(t.intermediate_values) < 1000 for t in trials)
    _, children = runs(isolated, "trial_timeout")
    assert {c.data.tags["fail_reason"] for c in children} == {"TrialTimeout: ran past trial_timeout (1 s)"}
    # each checkpoint went with its trial (the study's folder stays where a first epoch ended in time to write one)
    assert not [p for p in (isolated / "mlruns" / "checkpoints" / "trial_timeout").rglob("*") if not p.is_dir()]
