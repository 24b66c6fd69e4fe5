"""Tracking on a real MLflow SQLite store: runs, batched metrics, evaluation artifacts, models."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cifar_exp import track

CLASSES = ("cat", "dog", "ship")


@pytest.fixture()
def store(isolated: Path) -> str:
    uri = f"sqlite:///{isolated}/mlruns/mlflow.db"
    track.configure(uri)
    return uri


def test_sqlite_store_is_created_in_wal_mode(store: str, isolated: Path) -> None:
    import sqlite3

    with sqlite3.connect(isolated / "mlruns" / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_parent_and_child_runs_and_statuses(store: str) -> None:
    experiment = track.experiment_id("demo")
    assert track.experiment_id("demo") == experiment  # get, not create twice
    parent = track.start_parent(experiment, None, "demo-study", {"sweep": "demo"})
    assert track.start_parent(experiment, parent, "demo-study", {"x": "1"}) == parent  # resumed
    child = track.start_trial_run(experiment, parent, 7, params={"learning_rate": 0.01, "seed": 3},
                                  tags={"sweep": "demo"})
    for epoch in range(3):
        track.log_metrics(child, {"val_accuracy": 0.1 * epoch, "loss": 1.0 / (epoch + 1)}, step=epoch)
    track.end_run(child, "FAILED", {"fail_reason": "boom"})
    client = MlflowClient()
    run = client.get_run(child)
    assert run.data.tags[track.PARENT_TAG] == parent and run.data.tags["trial_number"] == "7"
    assert run.data.params == {"learning_rate": "0.01", "seed": "3"}
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == "boom"
    history = client.get_metric_history(child, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert client.get_run(parent).data.tags["x"] == "1"


def test_a_run_samples_system_metrics_until_it_ends(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(track, "SYSTEM_SAMPLING_SECONDS", 0.2)
    run = track.start_run(track.experiment_id("demo"), "r", {}, {})
    sampler = track._MONITORS[run]._process
    assert sampler is not None and sampler.is_alive()
    client = MlflowClient()
    deadline = time.monotonic() + 120  # samples are awaited, not slept for
    while len(client.get_metric_history(run, "system/system_memory_usage_megabytes")) < 2:
        assert time.monotonic() < deadline, "no two system samples within 120 s"
        time.sleep(0.1)
    track.end_run(run, "FINISHED")
    assert not sampler.is_alive() and run not in track._MONITORS  # ended: no sample can follow
    memory = client.get_metric_history(run, "system/system_memory_usage_megabytes")
    assert len(memory) >= 2 and all(m.value > 0 for m in memory)
    assert 0 <= client.get_run(run).data.metrics["system/cpu_utilization_percentage"] <= 100


def test_evaluation_artifacts_hold_what_they_claim(store: str, isolated: Path) -> None:
    experiment = track.experiment_id("demo")
    run = track.start_trial_run(experiment, "p", 0, params={}, tags={})
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_prob = np.eye(3)[[0, 1, 1, 1, 2, 2, 0]]
    images = np.zeros((7, 32, 32, 3), dtype=np.uint8)
    metrics = track.log_evaluation(run, images, y_true, y_prob, CLASSES, {"loss": [2.0, 1.0], "val_loss": [2.1, 1.2],
                                   "accuracy": [0.3, 0.6], "learning_rate": [0.1, 0.01]}, "t")
    assert metrics["test_recall_cat"] == 0.5 and metrics["test_precision_dog"] == pytest.approx(2 / 3)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run, dst_path=str(isolated / "dl")))
    assert {"confusion_matrix.csv", "confusion_matrix.png", "classification_report.json",
            "learning_curves.png", "prediction_grid.png"} <= {p.name for p in folder.iterdir()}
    rows = list(csv.reader((folder / "confusion_matrix.csv").open()))
    assert rows[0] == ["true \\ predicted", *CLASSES]
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum() == len(y_true) and counts[0].tolist() == [1, 1, 0] and counts[2].tolist() == [1, 0, 2]
    report = json.loads((folder / "classification_report.json").read_text())
    assert report["cat"]["recall"] == 0.5
    assert (folder / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # cat<->dog: one cat predicted dog; cat<->ship: one ship predicted cat; dog<->ship never
    pairs = list(csv.DictReader((folder / "confused_pairs.csv").open()))
    assert [(p["pair"], p["total"], p["a_as_b"], p["b_as_a"]) for p in pairs] == [
        ("cat <-> dog", "1", "1", "0"), ("cat <-> ship", "1", "0", "1")]
    logged = MlflowClient().get_run(run).data.metrics
    assert logged["test_macro_f1"] == pytest.approx(metrics["test_macro_f1"])


@pytest.mark.keras
def test_logged_model_loads_and_predicts(store: str) -> None:
    import keras

    model = keras.Sequential([keras.Input((32, 32, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    experiment = track.experiment_id("demo")
    run = track.start_trial_run(experiment, "p", 0, params={}, tags={})
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    uri = track.models.log_model(run, model, x[:2], [str(i) for i in range(10)])
    loaded, names = track.models.load_model(uri)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)
    assert names == [str(i) for i in range(10)]
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 32, 32, 3)}
    assert info.saved_input_example_info is not None  # the input example travels with the model


def test_retrying_retries_only_transient_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert track.retrying(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        track.retrying(lambda: (_ for _ in ()).throw(ValueError("bad value")))
