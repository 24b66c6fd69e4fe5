"""Models in MLflow: logging a trained Keras model with its signature and class names, loading
one safely, and the Model Registry (versions and aliases)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifar_exp.track import MetricGroup, ModelLink, _strings, log_metrics, retrying


def log_model(run_id: str, model: Any, example: np.ndarray, class_names: Sequence[str], *, step: int = 0,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              metrics: Sequence[MetricGroup] = (), dataset: tuple[str, str] | None = None,
              name: str = "model") -> str:
    """Log the Keras model (``.keras`` format) as an MLflow LoggedModel of ``run_id`` with a
    signature, an input example and its class names (model metadata ``class_names``); returns its
    model URI (``models:/m-...``). The model is the run's output at ``step`` (the 0-based epoch it
    was kept from), is named ``name`` (the UI's model lists show it) and has ``params`` and ``tags``
    of its own. ``metrics``, groups the run logged already, are linked to it and to ``dataset``
    (name, digest: ``view.log_dataset``'s) before its files are written, so that a model is never
    READY without them; they stay one record each in the run (logged again with their step and
    timestamp, see ``track.log_metrics``). No fluent run may be active in this process: MLflow
    would link the model to it.

    Decision: the model is created first and logged outside the run's context, then declared the
    run's output. ``Model.log`` inside a run links every metric the run has at the model's step
    to it, without their dataset (system metric samples included, since their step counts
    samples), and a second, dataset-linked record of the same metric is refused (MLflow 3.17:
    "UNIQUE constraint failed: logged_model_metrics..."). The model's ``MLmodel`` therefore names
    no run; ``model_run_id`` reads the run from the LoggedModel.

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
    client = MlflowClient()
    run = retrying(client.get_run, run_id)
    logged = retrying(client.create_logged_model, run.info.experiment_id, name=name, source_run_id=run_id,
                      params=_strings(params or {}) or None, tags=_strings(tags or {}) or None)
    try:
        for group in metrics:
            log_metrics(run_id, group.metrics, group.step, timestamp=group.timestamp,
                        link=ModelLink(logged.model_id, dataset))
        info = retrying(mlflow.models.Model.log, artifact_path=None, name="model", flavor=_KERAS_FLAVOR, model=model,
                        signature=signature, input_example=example, pip_requirements=requirements,
                        metadata={"class_names": list(class_names)}, validate_serving_input=False,
                        model_id=logged.model_id, run_id=None)
        retrying(client.log_outputs, run_id, [LoggedModelOutput(logged.model_id, step=step)])
    except BaseException:
        # a model that failed half-way is not left PENDING for a ranking or a registration to find
        with contextlib.suppress(Exception):
            client.delete_logged_model(logged.model_id)
        raise
    return str(info.model_uri)


def tag_model(model_uri: str, tags: Mapping[str, Any]) -> None:
    """Set ``tags`` on the logged model ``model_uri`` (``models:/m-...``)."""
    model_id = logged_model_id(model_uri)
    if model_id is None:
        raise ValueError(f"{model_uri} is not a logged model's URI (models:/m-...)")
    retrying(MlflowClient().set_logged_model_tags, model_id, _strings(tags))


def _save_keras_model(path: str, validate_serving_input: bool = True, **kwargs: Any) -> None:
    # mlflow.keras.save_model (MLflow 3.17) writes the input example before it creates the model
    # folder (FileNotFoundError: .../model/input_example.json); creating the folder first is
    # the whole fix. validate_serving_input is Model.log's switch, not save_model's: serving is
    # tested end to end instead of reloading every trial's model at log time.
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


# mlflow.keras with the save fix above; Model.log records it under mlflow.keras' name.
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)




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
    """The run that logged ``model_uri`` (a ``models:/`` name, version or alias, or a logged model):
    the LoggedModel's source run (``log_model`` writes no run into the ``MLmodel``), else the
    ``MLmodel``'s (a model logged inside a run, as MLflow's own ``log_model`` does)."""
    info = retrying(mlflow.models.get_model_info, model_uri)
    if info.model_id:
        with contextlib.suppress(MlflowException):
            source = retrying(MlflowClient().get_logged_model, info.model_id).source_run_id
            if source:
                return str(source)
    return info.run_id


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str
    created: bool  # False: the run was already registered under ``name``


class ModelGone(Exception):
    """A logged model that is no longer there (deleted by ``gc`` or by hand)."""


def model_exists(model_uri: str) -> bool:
    """Whether the logged model ``model_uri`` is still there (its entity and its ``MLmodel``)."""
    try:
        retrying(mlflow.models.get_model_info, model_uri)
    except (MlflowException, OSError):
        return False
    return True


def register(name: str, model_uri: str, run_id: str, description: str, tags: Mapping[str, Any]) -> Version:
    """Register ``model_uri`` (logged by ``run_id``) as a version of ``name``, with
    ``description`` and ``tags``. The same run registered twice gives back its existing version,
    completed: a registration killed after creating the version and before its description and
    tags were written gets them now. ``ModelGone`` if the model is not there any more; a
    registered model this call created is deleted again if no version could be made of it."""
    client = MlflowClient()
    existing = retrying(client.search_model_versions, f"name='{name}' and run_id='{run_id}'")
    if existing:
        version, created = existing[0], False
    else:
        if not model_exists(model_uri):
            raise ModelGone(model_uri)
        made = False
        try:
            retrying(client.create_registered_model, name)
            made = True
        except MlflowException as exc:
            if "already exists" not in str(exc).lower():
                raise
        try:
            version, created = retrying(_register_model, model_uri, name, _strings(tags)), True
        except BaseException:
            if made and not retrying(client.search_model_versions, f"name='{name}'"):
                # ours, and empty: a registered model with no version is no result
                retrying(client.delete_registered_model, name)
            raise
    if (version.description or "") != description:
        retrying(client.update_model_version, name, version.version, description=description)
    for key, value in _strings(tags).items():
        if (version.tags or {}).get(key) != value:
            retrying(client.set_model_version_tag, name, version.version, key, value)
    return Version(name, str(version.version), run_id, created=created)


def _register_model(model_uri: str, name: str, tags: Mapping[str, str]) -> Any:
    """``mlflow.register_model``, its messages ("Registered model ... already exists. Creating a new
    version...", "Created version ...") logged to the ``mlflow`` logger: MLflow prints them to
    stderr, past any logging configuration, where they would break a command's own output."""
    with contextlib.redirect_stderr(io.StringIO()) as said:
        try:
            return mlflow.register_model(model_uri, name, tags=dict(tags))
        finally:
            for line in said.getvalue().splitlines():
                if line.strip():
                    logging.getLogger("mlflow").info(line)


def alias_version(name: str, alias: str) -> Version | None:
    """The version of ``name`` that ``alias`` points at, or None."""
    try:
        version = retrying(MlflowClient().get_model_version_by_alias, name, alias)
    except MlflowException:
        return None
    return Version(name, str(version.version), str(version.run_id), created=False)


def version_tags(name: str, version: str) -> dict[str, str]:
    """The tags of version ``version`` of ``name``."""
    return dict(retrying(MlflowClient().get_model_version, name, version).tags or {})


def set_alias(name: str, alias: str, version: str) -> None:
    retrying(MlflowClient().set_registered_model_alias, name, alias, version)


def logged_model_id(model_uri: str) -> str | None:
    """The id of the logged model ``model_uri`` names (``models:/m-...``), None for another URI."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and rest.startswith("m-") and "/" not in rest and "@" not in rest else None


def protected_runs() -> tuple[set[str], set[str]]:
    """``(run ids, logged model ids)`` of every version in the Model Registry: what no collection
    may delete."""
    runs, models = set(), set()
    for version in retrying(MlflowClient().search_model_versions, max_results=100_000):
        if version.run_id:
            runs.add(str(version.run_id))
        source_id = version.model_id or logged_model_id(str(version.source or ""))
        if source_id:
            models.add(str(source_id))
    return runs, models


def delete_model(model_uri: str) -> int:
    """Delete the logged model ``model_uri`` through MLflow: its files from the artifact store, then
    the logged model itself. Returns the bytes its files took (0 for a model already gone)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    model_id = logged_model_id(model_uri)
    if model_id is None:
        raise ValueError(f"{model_uri} is not a logged model's URI (models:/m-...)")
    client = MlflowClient()
    try:
        model = retrying(client.get_logged_model, model_id)
    except MlflowException:
        return 0  # deleted already (by an earlier collection)
    repository = get_artifact_repository(model.artifact_location)
    size = _bytes(repository, None)
    repository.delete_artifacts()
    retrying(client.delete_logged_model, model_id)
    _remove_empty_folder(model.artifact_location, model_id)
    return size


def _remove_empty_folder(artifact_location: str, model_id: str) -> None:
    """On a local artifact store, the model's own folder (``models/<model_id>/``, which held
    ``artifacts/``): MLflow deletes what is in it and leaves it, one empty folder per model."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    if not artifact_location.startswith(("file:", "/")):
        return
    folder = Path(local_file_uri_to_path(artifact_location)).parent
    if folder.name == model_id:
        with contextlib.suppress(OSError):  # not empty (someone else's files): left as it is
            folder.rmdir()


def _bytes(repository: Any, path: str | None) -> int:
    total = 0
    for info in repository.list_artifacts(path):
        total += _bytes(repository, info.path) if info.is_dir else int(info.file_size or 0)
    return total
