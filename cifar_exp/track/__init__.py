"""Everything MLflow: the store, the sweep's parent run, one child run per trial, artifacts;
models and the registry in ``track.models``, the UI in ``track.ui``.

The only package that imports mlflow. Runs are addressed by id through ``MlflowClient`` (the
fluent "active run" does not cross processes); every child run names its parent explicitly.
Calls that can hit a busy SQLite file or a restarting server are retried with backoff.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
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

from cifar_exp.config import mask_credentials
from cifar_exp.metrics import write_report

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
    its owner only) with MLflow's schema if needed, one process at a time (``<file>.lock``), all
    or nothing (``_create_store``). A
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
            _create_store(path)
        retrying(MlflowClient().search_experiments, max_results=1)
    finally:
        os.close(fd)  # releases the lock


def _create_store(path: Path) -> None:
    """A new SQLite store at ``path`` with MLflow's whole schema, all or nothing: made in a
    temporary file beside it and renamed into place. A process killed while MLflow migrated a
    store in place left it half made (``_alembic_tmp_experiments``), and every later command
    failed on it. Called under the store's lock, so temporary files left by a killed creator are
    nobody's and go."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine_with_retry

    for left in path.parent.glob(f".{path.name}.*.creating*"):
        left.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".creating")
    os.close(fd)  # mkstemp makes it readable by its owner only
    try:
        engine = create_sqlalchemy_engine_with_retry(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # recorded in the file; readers proceed while one writes
        finally:
            db.close()  # the last connection: its write-ahead log is folded into the file
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, f"{tmp}-wal", f"{tmp}-shm", f"{tmp}-journal"):
            Path(leftover).unlink(missing_ok=True)


# The MLflow UI opens an experiment on its runs table only when the experiment says it holds
# model training: without this tag MLflow 3's UI opened ours on its GenAI overview (traces, tokens).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(name: str) -> str:
    """The id of the experiment ``name``, created (artifacts beside the store) if missing, of the
    kind whose UI page is the runs table (``EXPERIMENT_KIND``)."""
    client = MlflowClient()
    experiment = retrying(client.get_experiment_by_name, name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            retrying(client.restore_experiment, experiment.experiment_id)
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:  # a store from before the tag
                retrying(client.set_experiment_tag, experiment.experiment_id, key, value)
        return str(experiment.experiment_id)
    try:
        return str(retrying(client.create_experiment, name, tags=EXPERIMENT_KIND))
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


@dataclass(frozen=True)
class ModelLink:
    """What metrics describe, in MLflow 3's terms: the logged model ``model_id`` measured on the
    dataset ``dataset`` (its name and digest, as ``view.log_dataset`` logged it to the run)."""

    model_id: str
    dataset: tuple[str, str] | None = None


@dataclass(frozen=True)
class MetricGroup:
    """Metrics a run logged together: at ``step``, stamped ``timestamp`` (what ``log_metrics``
    returned), to be linked to a model afterwards (``models.log_model``)."""

    metrics: Mapping[str, float]
    step: int
    timestamp: int


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0, *, timestamp: int | None = None,
                link: ModelLink | None = None) -> int:
    """All ``metrics`` at ``step`` in one batched call, stamped ``timestamp`` (milliseconds; now by
    default), linked to ``link``'s model and dataset if given. Returns the timestamp.

    Metrics logged again with the same key, step, value and timestamp are one record of the run
    (MLflow drops the copy): that is how an epoch's metrics, logged while training, are linked to
    the model kept from that epoch afterwards without a second point in the run's charts."""
    stamp = int(time.time() * 1000) if timestamp is None else timestamp
    model_id = link.model_id if link else None
    name, digest = link.dataset if link and link.dataset else (None, None)
    batch = [Metric(k, float(v), stamp, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
             for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        retrying(MlflowClient().log_batch, run_id, metrics=batch[i:i + 1000])
    return stamp


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
# trial of the CNN family on an H100 lasts tens of seconds; MLflow's environment variable
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
    return start_run(experiment, view.trial_run_name(trial_number), params,
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


def log_test(run_id: str, result: Any, splits: Any, title: str) -> MetricGroup:
    """Log a finished training's test evaluation: test metrics, parameter count, the model's
    summary, and the evaluation's metrics and files (``log_evaluation``: per-class precision,
    recall, F1), all at step 0 with one timestamp. Returns them (what ``models.log_model`` links
    to the model). ``result`` is a ``train.TrainResult``."""
    model = result.model
    basics = {"test_loss": result.test_loss, "test_accuracy": result.test_accuracy,
              "param_count": float(model.count_params())}
    stamp = log_metrics(run_id, basics)
    lines: list[str] = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line), expand_nested=True)
    log_text(run_id, "\n".join(lines) + "\n", "model_summary.txt")
    measured = log_evaluation(run_id, splits.x_test, splits.y_test, result.y_prob, splits.class_names, result.history,
                              title=title, kept_epoch=result.kept_epoch, timestamp=stamp)
    return MetricGroup({**basics, **measured}, 0, stamp)


def log_evaluation(run_id: str, images: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray,
                   class_names: Sequence[str], history: Mapping[str, Sequence[float]] | None,
                   title: str, kept_epoch: int | None = None, timestamp: int | None = None) -> dict[str, float]:
    """Log a test-set evaluation (``metrics.write_report``): its metrics (stamped ``timestamp``,
    now by default), and its files as artifacts. Returns the metrics logged."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = write_report(Path(tmp), images, y_true, y_prob, class_names, history, title, kept_epoch)
        log_metrics(run_id, metrics, timestamp=timestamp)
        retrying(MlflowClient().log_artifacts, run_id, tmp)
    return metrics


def log_curves(run_id: str, history: Mapping[str, Sequence[float]], title: str) -> None:
    """Log ``learning_curves.png`` of ``history`` (a trial stopped early: no test pass, but the
    epochs it ran are worth a look)."""
    from cifar_exp.metrics import plots

    with tempfile.TemporaryDirectory() as tmp:
        plots.learning_curves_png(history, Path(tmp) / "learning_curves.png", title, None)
        retrying(MlflowClient().log_artifacts, run_id, tmp)


def log_dir(run_id: str, folder: Path) -> None:
    """Log every file in ``folder`` as an artifact at the run's root (same names replace)."""
    retrying(MlflowClient().log_artifacts, run_id, str(folder))


def running_children(experiment: str, parent_run_id: str) -> dict[str, int]:
    """The trial runs under ``parent_run_id`` that are still RUNNING: run id -> trial number."""
    runs = retrying(MlflowClient().search_runs, [experiment],
                    f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'", max_results=50_000)
    # A trial's run has its number; other runs under the parent (register's confirmation runs) are no trial's.
    return {str(r.info.run_id): int(r.data.tags["trial_number"]) for r in runs if "trial_number" in r.data.tags}


def running_confirmations(experiment: str, parent_run_id: str) -> dict[str, dict[str, str]]:
    """The confirmation runs (``register --seeds``) under ``parent_run_id`` still RUNNING: run id -> tags."""
    runs = retrying(MlflowClient().search_runs, [experiment],
                    f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'", max_results=50_000)
    return {str(r.info.run_id): dict(r.data.tags) for r in runs if "confirmation" in r.data.tags}


def find_experiment(name: str) -> str | None:
    """The id of the existing experiment ``name``, or None."""
    experiment = retrying(MlflowClient().get_experiment_by_name, name)
    return None if experiment is None else str(experiment.experiment_id)


# Last: they build on the helpers above (retrying, _strings).
from cifar_exp.track import models, server, ui, view  # noqa: E402, F401
from cifar_exp.track.server import _credentials_to_env, check_server  # noqa: E402
