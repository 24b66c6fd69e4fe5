"""Everything MLflow: the store, the sweep's parent run, one child run per trial, artifacts, models.

The only module that imports mlflow. Runs are addressed by id through ``MlflowClient`` (the
fluent "active run" does not cross processes); every child run names its parent explicitly.
Calls that can hit a busy SQLite file or a restarting server are retried with backoff.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
import time
import types
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from cifar_exp import evaluation, plots
from cifar_exp.config import UserError, mask_credentials

T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"
# MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per call.
_BATCH_PARAMS = 100


def _transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("database is locked", "connection", "timed out", "temporarily",
                                   "503", "502", "504"))


def retrying(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried with exponential backoff (0.1 s .. 5 s) on transient errors."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts - 1 or not _transient(exc):
                raise
            time.sleep(min(0.1 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def configure(tracking_uri: str) -> None:
    """Point this process at ``tracking_uri``; a local SQLite file is created (WAL mode, readable by
    its owner only) with MLflow's schema if needed, one process at a time (``<file>.lock``). A
    tracking server (``http(s)://``) must answer its health check: ``UserError`` if it does not,
    before anything is written anywhere.

    Decision: WAL lets readers (the UI, other workers) proceed while one worker writes, which
    is what keeps several workers on one SQLite file clear of "database is locked".
    """
    check_server(tracking_uri)
    mlflow.set_tracking_uri(_credentials_to_env(tracking_uri))
    if not tracking_uri.startswith("sqlite:///"):
        return
    import fcntl

    path = Path(tracking_uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    # MLflow creates (and migrates) its schema on first use; two processes doing it at once on a
    # fresh file crashed one of them (alembic "expected to match one row", "duplicate column").
    # One process at a time creates the file and the schema; the others find them made.
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            with sqlite3.connect(path) as db:
                db.execute("PRAGMA journal_mode=WAL")
        retrying(MlflowClient().search_experiments, max_results=1)
    finally:
        os.close(fd)  # releases the lock


def _credentials_to_env(tracking_uri: str) -> str:
    """``tracking_uri`` without ``user:password@``, which go to MLflow's own variables
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` (where MLflow's client reads
    them, for every request; they are not in the URI that MLflow stores or prints)."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or parts.username is None:
        return tracking_uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_server(tracking_uri: str) -> None:
    """``UserError`` if ``tracking_uri`` is a tracking server (``http(s)://``) that does not answer
    its health check, or refuses this user (credentials from the URI or MLflow's variables, see
    ``_credentials_to_env``); writes nothing."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    plain = _credentials_to_env(tracking_uri)
    try:
        with urllib.request.urlopen(f"{plain.rstrip('/')}/health", timeout=10) as response:
            response.read()
    except OSError as exc:  # refused, timed out, or an HTTP error status
        raise UserError(f"the MLflow tracking server {mask_credentials(tracking_uri)} does not answer "
                        f"({getattr(exc, 'reason', exc)}): start it (README, 'Many hosts') or fix "
                        f"--tracking-uri") from None
    try:  # /health needs no login; this does, through MLflow's own client and credentials
        MlflowClient(plain).search_experiments(max_results=1)
    except MlflowException as exc:
        status = getattr(exc, "get_http_status_code", lambda: None)()
        reason = mask_credentials(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if status in (401, 403) or "401" in reason or "403" in reason or "Unauthorized" in reason:
            raise UserError(f"the MLflow tracking server {mask_credentials(plain)} refused this user ({reason[:200]}): "
                            f"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (README, 'Many hosts')"
                            ) from None
        raise UserError(f"the MLflow tracking server {mask_credentials(plain)} failed a request ({reason[:200]})"
                        ) from None


def experiment_id(name: str) -> str:
    """The id of the experiment ``name``, created (artifacts beside the store) if missing."""
    client = MlflowClient()
    experiment = retrying(client.get_experiment_by_name, name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            retrying(client.restore_experiment, experiment.experiment_id)
        return str(experiment.experiment_id)
    try:
        return str(retrying(client.create_experiment, name))
    except MlflowException:  # created by another process in the meantime
        experiment = retrying(client.get_experiment_by_name, name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def start_parent(experiment: str, run_id: str | None, name: str, tags: Mapping[str, str]) -> str:
    """Reopen the parent run ``run_id`` if it exists in ``experiment``; else create one. Returns its id."""
    client = MlflowClient()
    if run_id:
        try:
            run = retrying(client.get_run, run_id)
            if run.info.experiment_id == experiment and run.info.lifecycle_stage == "active":
                retrying(client.update_run, run_id, status="RUNNING")
                set_tags(run_id, tags)
                return run_id
        except MlflowException:
            pass  # gone (another store, or deleted): start a new parent
    run = retrying(client.create_run, experiment, run_name=name, tags=_strings(tags))
    return str(run.info.run_id)


def _strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Params or tags as MLflow stores them: strings, with any URL's password hidden (a storage URL
    or a command line must not put a credential in the tracking store)."""
    return {k: mask_credentials(str(v)) for k, v in values.items()}


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    tag_list = [RunTag(k, v) for k, v in _strings(tags).items()]
    for i in range(0, len(tag_list), 100):
        retrying(MlflowClient().log_batch, run_id, tags=tag_list[i:i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """All ``metrics`` at ``step`` in one batched call."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        retrying(MlflowClient().log_batch, run_id, metrics=batch[i:i + 1000])


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, v) for k, v in _strings(params).items()]
    for i in range(0, len(items), _BATCH_PARAMS):
        retrying(MlflowClient().log_batch, run_id, params=items[i:i + _BATCH_PARAMS])


def end_run(run_id: str, status: str, tags: Mapping[str, Any] | None = None) -> None:
    """Set ``tags``, then end the run with ``status`` (FINISHED, FAILED or KILLED); its system
    metrics monitor, if this process runs one, logs its last samples and stops first."""
    monitor = _MONITORS.pop(run_id, None)
    if monitor is not None:
        monitor.finish()
    if tags:
        set_tags(run_id, tags)
    retrying(MlflowClient().set_terminated, run_id, status=status)


# System metrics: MLflow's own monitor (psutil; NVML for NVIDIA GPUs), one thread per open run,
# logged as ``system/...`` metrics. Decision: a sample every 5 s rather than MLflow's 10 s, since a
# trial of the seed CNN on an H100 lasts tens of seconds; MLflow's environment variable
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still overrides it.
SYSTEM_PREFIX = "system/"
SYSTEM_SAMPLING_SECONDS = 5.0
_MONITORS: dict[str, SystemMetricsMonitor] = {}


def start_run(experiment: str, name: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    """Create a run named ``name`` in ``experiment`` with ``params`` and ``tags``, and start sampling
    this machine's system metrics into it until :func:`end_run`; returns its id."""
    run = retrying(MlflowClient().create_run, experiment, run_name=name, tags=_strings(tags))
    run_id = str(run.info.run_id)
    log_params(run_id, params)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_SAMPLING_SECONDS,
                                   tracking_uri=mlflow.get_tracking_uri())
    monitor.start()
    _MONITORS[run_id] = monitor
    return run_id


def start_trial_run(experiment: str, parent_run_id: str, trial_number: int,
                    params: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    """Create the child run of trial ``trial_number`` under ``parent_run_id``, with its params."""
    return start_run(experiment, f"trial-{trial_number}", params,
                     {PARENT_TAG: parent_run_id, "trial_number": trial_number, **tags})


@dataclass(frozen=True)
class RunRecord:
    """What MLflow holds about one run (params and tags as the strings MLflow stores)."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # the latest value of each metric


def get_run(run_id: str) -> RunRecord:
    """The run ``run_id``; raises ``LookupError`` if the store has no such run."""
    try:
        run = retrying(MlflowClient().get_run, run_id)
    except MlflowException as exc:
        raise LookupError(str(exc).splitlines()[0]) from None
    return RunRecord(str(run.info.run_id), str(run.info.experiment_id), run.info.run_name or "", run.info.status,
                     dict(run.data.params), dict(run.data.tags), dict(run.data.metrics))


def metric_history(run_id: str, key: str) -> list[float]:
    """The values of metric ``key`` by step (0, 1, ...); where a step was logged twice, the last."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in retrying(MlflowClient().get_metric_history, run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [by_step[step][1] for step in sorted(by_step)]


def log_text(run_id: str, text: str, path: str) -> None:
    retrying(MlflowClient().log_text, run_id, text, path)


def read_text(run_id: str, path: str) -> str | None:
    """The text artifact ``path`` of ``run_id``, or None if the run has none."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return Path(local).read_text(encoding="utf-8")


def log_result(run_id: str, result: Any, splits: Any, title: str) -> str:
    """Log a finished training's test evaluation (metrics and artifacts, see ``log_evaluation``)
    and its model to ``run_id``; returns the model URI. ``result`` is a ``train.TrainResult``."""
    model = result.model
    log_metrics(run_id, {"test_loss": result.test_loss, "test_accuracy": result.test_accuracy,
                         "param_count": float(model.count_params())})
    lines: list[str] = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line), expand_nested=True)
    log_text(run_id, "\n".join(lines) + "\n", "model_summary.txt")
    log_evaluation(run_id, splits.x_test, splits.y_test, result.y_prob, splits.class_names, result.history,
                   title=title)
    return log_model(run_id, model, splits.x_test[:2], splits.class_names)


def confused_pairs(counts: np.ndarray, class_names: Sequence[str], top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` class pairs most often mistaken for each other, most first: ``a_as_b`` counts
    true a predicted b, ``b_as_a`` the reverse, ``total`` both; pairs never confused are left out."""
    pairs: list[dict[str, Any]] = [
        {"pair": f"{class_names[a]} <-> {class_names[b]}", "total": int(counts[a, b] + counts[b, a]),
         "a_as_b": int(counts[a, b]), "b_as_a": int(counts[b, a])}
        for a in range(len(class_names)) for b in range(a + 1, len(class_names)) if counts[a, b] + counts[b, a]]
    return sorted(pairs, key=lambda pair: -pair["total"])[:top]


GRID_IMAGES = 24  # test images in prediction_grid.png


def log_evaluation(run_id: str, images: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray,
                   class_names: Sequence[str], history: Mapping[str, Sequence[float]] | None,
                   title: str) -> dict[str, float]:
    """Log a test-set evaluation: per-class precision/recall/F1 and macro F1 as metrics;
    confusion matrix (PNG, CSV), the most-confused class pairs (CSV), classification report
    (JSON), a grid of predictions (PNG: misclassified images across classes, then correct ones,
    see ``evaluation.grid_picks``) and, given a ``history``, learning
    curves (PNG) as artifacts.
    Returns the metrics logged."""
    from sklearn.metrics import classification_report, confusion_matrix

    y_pred = y_prob.argmax(axis=1)
    labels = list(range(len(class_names)))
    counts = confusion_matrix(y_true, y_pred, labels=labels)
    report = classification_report(y_true, y_pred, labels=labels, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    metrics = {"test_macro_f1": float(report["macro avg"]["f1-score"])}
    for name in class_names:
        for key, short in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1")):
            metrics[f"test_{short}_{name}"] = float(report[name][key])
    log_metrics(run_id, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with (out / "confusion_matrix.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *class_names])
            for name, row in zip(class_names, counts, strict=True):
                writer.writerow([name, *map(int, row)])
        (out / "classification_report.json").write_text(json.dumps(report, indent=2))
        with (out / "confused_pairs.csv").open("w", newline="") as f:
            pairs = csv.DictWriter(f, fieldnames=["pair", "total", "a_as_b", "b_as_a"])
            pairs.writeheader()
            pairs.writerows(confused_pairs(counts, class_names))
        plots.confusion_matrix_png(counts, class_names, out / "confusion_matrix.png", title)
        shown = evaluation.grid_picks(y_true, y_pred, GRID_IMAGES)
        plots.prediction_grid_png(images[shown], y_true[shown], y_pred[shown], class_names,
                                  out / "prediction_grid.png", title, y_prob[shown, y_pred[shown]])
        if history is not None:
            plots.learning_curves_png(history, out / "learning_curves.png", title)
        retrying(MlflowClient().log_artifacts, run_id, str(out))
    return metrics


def log_model(run_id: str, model: Any, example: np.ndarray, class_names: Sequence[str]) -> str:
    """Log the Keras model (``.keras`` format) to ``run_id`` with a signature, an input example and
    its class names (model metadata ``class_names``); returns its model URI.

    The signature takes float32 images of pixel values 0..255: a REST request's integer or float
    pixels are parsed to it; pyfunc callers pass float32 (pyfunc enforces the dtype exactly).
    Decision: pip requirements are given, not inferred; inference reloads the model in a
    subprocess, which would cost seconds per trial.
    """
    import keras

    backend = keras.backend.backend()
    backend_pkg = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend)
    from importlib.metadata import version

    requirements = [f"keras=={keras.__version__}", f"{backend_pkg}=={version(backend_pkg)}"]
    example = np.asarray(example, dtype="float32")
    signature = mlflow.models.infer_signature(example, np.asarray(model(example)))
    with mlflow.start_run(run_id=run_id):
        info = retrying(mlflow.models.Model.log, artifact_path=None, name="model", flavor=_KERAS_FLAVOR, model=model,
                        signature=signature, input_example=example, pip_requirements=requirements,
                        metadata={"class_names": list(class_names)}, validate_serving_input=False)
    return str(info.model_uri)


def _save_keras_model(path: str, validate_serving_input: bool = True, **kwargs: Any) -> None:
    # mlflow.keras.save_model (MLflow 3.17) writes the input example before it creates the model
    # folder (FileNotFoundError: .../model/input_example.json); creating the folder first is
    # the whole fix. validate_serving_input is Model.log's switch, not save_model's: serving is
    # tested end to end instead of reloading every trial's model at log time.
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


# mlflow.keras with the save fix above; Model.log records it under mlflow.keras' name.
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)


# ---------------------------------------------------------------------------------------------
# Loading models safely; the Model Registry


class UnsafeModel(Exception):
    """A logged model that loading would run foreign code or unpickle."""


def check_safe(model_uri: str) -> dict[str, Any]:
    """The MLmodel flavors of ``model_uri`` if loading it runs only MLflow's and Keras' own code
    on data files; raises ``UnsafeModel`` naming the reason otherwise (custom pyfunc code,
    pickled python models, TensorFlow SavedModel exports, flavors other than keras)."""
    flavors = retrying(mlflow.models.get_model_info, model_uri).flavors
    pyfunc = flavors.get("python_function", {})
    loader = str(pyfunc.get("loader_module", ""))
    if pyfunc.get("code") or "python_model" in pyfunc or "cloudpickle_version" in pyfunc:
        raise UnsafeModel("it carries Python code or a pickled python_model")
    if loader and not loader.startswith("mlflow."):
        raise UnsafeModel(f"its MLmodel loads through code outside mlflow ({loader})")
    if set(flavors) - {"keras", "python_function"}:
        raise UnsafeModel(f"flavors {sorted(set(flavors) - {'keras', 'python_function'})} (only keras is loaded)")
    if "keras" not in flavors:
        raise UnsafeModel("no keras flavor")
    if flavors["keras"].get("save_exported_model") or flavors["keras"].get("save_format", "keras") != "keras":
        raise UnsafeModel("it is not in the .keras format (safe_mode applies to .keras files only)")
    return flavors


def load_model(model_uri: str) -> tuple[Any, list[str] | None]:
    """``(keras model, class names or None)`` for ``model_uri``, after ``check_safe``, loaded with
    Keras ``safe_mode`` on (no Lambda-layer bytecode is deserialized)."""
    check_safe(model_uri)
    try:
        model = retrying(mlflow.keras.load_model, model_uri, load_model_kwargs={"safe_mode": True})
    except (TypeError, ValueError) as exc:  # Keras' safe_mode refusal, which it words as a generic failure
        text = str(exc)
        if "safe_mode" in text or "lambda" in text.lower() or "could not be deserialized" in text:
            raise UnsafeModel("Keras' safe_mode refused it: it holds a Lambda layer (Python bytecode) or a class "
                              "that is not Keras' own, which loading would run; only stock layers are loaded") from None
        raise
    metadata = retrying(mlflow.models.get_model_info, model_uri).metadata or {}
    names = metadata.get("class_names")
    return model, list(names) if names else None


def model_run_id(model_uri: str) -> str | None:
    """The run that logged ``model_uri`` (a ``models:/`` name, version or alias, or a logged model)."""
    return retrying(mlflow.models.get_model_info, model_uri).run_id


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str
    created: bool  # False: the run was already registered under ``name``


def register(name: str, model_uri: str, run_id: str, description: str, tags: Mapping[str, Any]) -> Version:
    """Register ``model_uri`` (logged by ``run_id``) as a version of ``name``. The same run
    registered twice gives back its existing version."""
    client = MlflowClient()
    existing = retrying(client.search_model_versions, f"name='{name}' and run_id='{run_id}'")
    if existing:
        return Version(name, str(existing[0].version), run_id, created=False)
    try:
        retrying(client.create_registered_model, name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower():
            raise
    version = retrying(mlflow.register_model, model_uri, name, tags=_strings(tags))
    retrying(client.update_model_version, name, version.version, description=description)
    return Version(name, str(version.version), run_id, created=True)


def alias_version(name: str, alias: str) -> Version | None:
    """The version of ``name`` that ``alias`` points at, or None."""
    try:
        version = retrying(MlflowClient().get_model_version_by_alias, name, alias)
    except MlflowException:
        return None
    return Version(name, str(version.version), str(version.run_id), created=False)


def set_alias(name: str, alias: str, version: str) -> None:
    retrying(MlflowClient().set_registered_model_alias, name, alias, version)


def log_dir(run_id: str, folder: Path) -> None:
    """Log every file in ``folder`` as an artifact at the run's root (same names replace)."""
    retrying(MlflowClient().log_artifacts, run_id, str(folder))


def find_experiment(name: str) -> str | None:
    """The id of the existing experiment ``name``, or None."""
    experiment = retrying(MlflowClient().get_experiment_by_name, name)
    return None if experiment is None else str(experiment.experiment_id)


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


UI_ORIGINS_ENV = "CIFAR_EXP_UI_ORIGINS"  # comma-separated origins that may change the store through the UI
_WRITES = (b"POST", b"PUT", b"PATCH", b"DELETE")


class SameOriginWrites:
    """ASGI middleware: a state-changing request that carries an ``Origin`` header other than the
    ``origins`` is refused (403). MLflow's own guard lets every localhost origin through, so any
    other program's page on this machine could change the store; requests without ``Origin``
    (the Python client, curl) are no browser page and pass."""

    def __init__(self, app: Any, origins: frozenset[str]) -> None:
        self.app, self.origins = app, origins

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"].encode() in _WRITES:
            origin = dict(scope["headers"]).get(b"origin")
            if origin is not None and origin.decode("latin-1") not in self.origins:
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body",
                            "body": b"cross-origin request refused: only the UI's own pages may change the store"})
                return
        await self.app(scope, receive, send)


def create_ui_app() -> Any:
    """The MLflow app that ``python -m cifar_exp.ui`` serves (``mlflow ui --app-name cifar-exp-ui``,
    an ``mlflow.app`` entry point): MLflow's own, behind ``SameOriginWrites`` for the origins in
    ``$CIFAR_EXP_UI_ORIGINS``."""
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    origins = frozenset(o for o in os.environ.get(UI_ORIGINS_ENV, "").split(",") if o)
    return SameOriginWrites(create_fastapi_app(flask_app), origins)

