"""MLflow 3's model-centric records of a sweep: the model each trial keeps is a LoggedModel of the
epoch it was kept from, with the metrics that judge it linked to it and to the data, so that
``mlflow.search_logged_models`` ranks a study's models as the project does
(``sweep.storage.best_trials``), on 64 synthetic images and a tiny CNN in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus

from cifar_exp.lifecycle import steps
from cifar_exp.sweep import storage, supervisor
from tests.test_engines import CNN, Store

# test_engines' tiny CNN, trained longer and keeping its best epoch, four trials over a wider range
SWEEP = CNN.replace("high: 1.0e-2", "high: 3.0e-2").replace("seed: 3", "seed: 5").replace(
    "epochs: 2\ntrials: 1\n", "epochs: 3\ntrials: 4\nmodel_epoch: best\n")


def ranked_by_mlflow(experiment: str, metric: str) -> list[Any]:
    """The call docs/tracking.md shows: a study's registrable models, best first."""
    return mlflow.search_logged_models(
        experiment_ids=[experiment], filter_string="tags.registrable = 'true'",
        order_by=[{"field_name": f"metrics.{metric}", "ascending": False},
                  {"field_name": "creation_timestamp", "ascending": True}], output_format="list")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Four trials. 64 random images teach nothing, so the verdict on their numbers is given:
    trial 1 degenerate (as a trial at chance), the others sound."""
    folder = tmp_path_factory.mktemp("logged")
    store = Store(folder, "logged", SWEEP)
    judge = steps.judge
    for number in range(4):
        verdict = {"degenerate": "predicts one class"} if number == 1 else {}
        steps.judge = lambda *args, verdict=verdict: verdict  # type: ignore[assignment]
        try:
            store.optuna_trial()
        finally:
            steps.judge = judge
    return store


def test_each_kept_model_is_a_logged_model_of_its_epoch_linked_to_its_metrics_and_the_data(swept: Store) -> None:
    client = swept.client
    for trial in swept.study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        model = client.get_logged_model(trial.user_attrs["model_uri"].removeprefix("models:/"))
        kept = int(run.data.tags["model_epoch"]) - 1
        history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_accuracy"),
                                           key=lambda m: m.step)]
        assert kept == max(range(3), key=lambda e: (history[e], -e))  # the best epoch, the first of ties
        assert model.source_run_id == run.info.run_id and model.status == LoggedModelStatus.READY
        assert model.name == f"trial-{trial.number:03d}"  # the UI's model lists name the trial
        assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, kept)]
        assert model.tags["trial_number"] == str(trial.number) and model.tags["model_epoch"] == str(kept + 1)
        assert model.params["learning_rate"] == run.data.params["learning_rate"]
        linked = {m.key: m for m in model.metrics}
        dataset = run.inputs.dataset_inputs[0].dataset
        assert {m.dataset_name for m in model.metrics} == {dataset.name}
        assert {m.dataset_digest for m in model.metrics} == {dataset.digest}
        # that epoch's metrics, at its step; the test set's; nothing else of the run's (no system sample)
        assert linked["val_accuracy"].value == history[kept] == trial.values[0]
        assert {m.step for m in model.metrics if m.key in ("loss", "val_loss", "accuracy")} == {kept}
        assert linked["test_accuracy"].value == run.data.metrics["test_accuracy"]
        assert not [k for k in linked if k.startswith(("system/", "time/"))]
        # linking wrote no second point into the run's charts
        assert len(history) == 3
        assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 1


def test_search_logged_models_ranks_a_studys_models_as_the_project_does(swept: Store) -> None:
    best = storage.best_trials(swept.study, swept.sweep.objectives, 10)
    project = [t.user_attrs["model_uri"].removeprefix("models:/") for t in best if t.number != 1]
    found = ranked_by_mlflow(swept.experiment, "val_accuracy")
    assert [m.model_id for m in found] == project
    assert len(project) == 3


def test_a_degenerate_trials_model_is_never_registrable(swept: Store) -> None:
    degenerate = swept.study.trials[1]
    model = swept.client.get_logged_model(degenerate.user_attrs["model_uri"].removeprefix("models:/"))
    assert model.tags["degenerate"] == "predicts one class"
    assert "registrable" not in model.tags
    assert model.model_id not in {m.model_id for m in ranked_by_mlflow(swept.experiment, "val_accuracy")}


def test_a_model_whose_logging_fails_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path, "broken", SWEEP.replace("trials: 4", "trials: 1"))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(mlflow.models.Model, "log", refuse)
    with pytest.raises(AssertionError):  # the trial failed: its worker says so
        store.optuna_trial()
    assert store.study.trials[0].state.name == "FAIL"
    assert "No space left on device" in store.study.trials[0].user_attrs["fail_reason"]
    assert mlflow.search_logged_models(experiment_ids=[store.experiment], output_format="list") == []


def test_a_run_closed_after_its_trial_completed_elsewhere_gets_its_model_tagged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker told the study COMPLETE but could not end the run (a tracking server down): the
    sweep's next start closes the run as its trial ended, and tags the sound model registrable."""
    store = Store(tmp_path, "orphan", SWEEP.replace("trials: 4", "trials: 1"))
    monkeypatch.setattr(steps, "judge", lambda *args: {})
    monkeypatch.setattr(steps, "end", lambda *args, **kwargs: None)  # the run's end is lost
    run_id = store.optuna_trial()
    trial = store.study.trials[0]
    model_id = trial.user_attrs["model_uri"].removeprefix("models:/")
    assert store.client.get_run(run_id).info.status == "RUNNING"
    assert "registrable" not in store.client.get_logged_model(model_id).tags
    monkeypatch.undo()
    assert supervisor.close_orphans(store.study, store.experiment, store.parent) == [run_id]
    assert store.client.get_run(run_id).info.status == "FINISHED"
    assert store.client.get_logged_model(model_id).tags["registrable"] == "true"
