"""How a sweep's runs show in the MLflow UI: trial run names that sort and say how a trial
ended, the bookkeeping metrics' prefix, the data as a dataset input, and the saved view of a
sweep's trials that ``cifar-exp ui`` opens on."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from cifar_exp.track import retrying

RUN_NAME_TAG = "mlflow.runName"
# A trial's bookkeeping metrics (its seconds by phase, its first step's) under one prefix: the
# MLflow UI draws them in a section of their own, below the model's metrics (val_accuracy, loss,
# ...), as it does MLflow's system/ metrics. The Optuna trial keeps them without it.
TIME_PREFIX = "time/"


def trial_run_name(trial_number: int, state: str = "COMPLETE", interrupted: bool = False) -> str:
    """A trial's run name: ``trial-007``, sorting as the trials do (the UI sorts names as text),
    and once it ended other than complete, what became of it: ``trial-007 pruned``, ``trial-007
    failed``, ``trial-007 interrupted``; told apart at a glance in the runs table."""
    name = f"trial-{trial_number:03d}"
    if interrupted:
        return f"{name} interrupted"
    return name if state == "COMPLETE" else f"{name} {'pruned' if state == 'PRUNED' else 'failed'}"


def log_dataset(run_id: str, source: str, checksum: str, sizes: Mapping[str, int]) -> tuple[str, str]:
    """The data a run trained on as an MLflow dataset input (the runs table's Dataset column,
    ``search_runs``' ``datasets`` filter): named for its source (``keras`` is Keras' download of
    CIFAR-10, else the path's file name), digest as much of the data checksum as MLflow takes (36
    characters; the whole is the run's ``data_checksum`` tag), the split sizes as its profile.
    Returns its name and digest (what the metrics of the run's model are linked to)."""
    if source == "keras":
        name, kind, where = "cifar10 (keras)", "http", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    else:
        name, kind, where = f"cifar10 ({Path(source).name})", "local", os.path.abspath(source)
    dataset = Dataset(name=name, digest=checksum[:36] or "unknown", source_type=kind,
                      source=json.dumps({"uri": where}), profile=json.dumps(dict(sizes)))
    retrying(MlflowClient().log_inputs, run_id,
             datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])
    return dataset.name, dataset.digest


# The MLflow UI's saved view of a sweep's trials: an experiment tag its runs page reads when the
# address carries ``viewStateShareKey`` (how the UI's own Share button saves a view). Its first
# screen was one collapsed parent row without a metric column; this view lists the trials (the
# runs named ``trial-...``), best first, with the objectives, test accuracy, the searched
# parameters and each trial's state as columns.
TRIALS_VIEW = "cifar-exp-trials"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."


def share_trials_view(experiment: str, objectives: Sequence[tuple[str, str]], params: Sequence[str]) -> None:
    """Save ``TRIALS_VIEW`` on ``experiment``: the trials sorted by the first of ``objectives``
    (metric, direction), their columns the objectives, ``test_accuracy``, ``params`` and ``state``."""
    metrics = [metric for metric, _ in objectives] + [m for m in ("test_accuracy",) if m not in dict(objectives)]
    first, direction = objectives[0]
    view = {"searchFilter": "attributes.run_name LIKE 'trial-%'", "orderByKey": f"metrics.`{first}`",
            "orderByAsc": direction == "minimize", "startTime": "ALL",
            "selectedColumns": [*(f"metrics.`{m}`" for m in metrics), *(f"params.`{p}`" for p in params),
                                "tags.`state`"]}
    retrying(MlflowClient().set_experiment_tag, experiment, SHARED_VIEW_PREFIX + TRIALS_VIEW,
             json.dumps(view, separators=(",", ":")))


def has_trials_view(experiment: str) -> bool:
    """Whether ``experiment`` has the saved view of its trials (a store from before it has not)."""
    found = retrying(MlflowClient().get_experiment, experiment)
    return SHARED_VIEW_PREFIX + TRIALS_VIEW in found.tags
