"""The engine contract of ``lifecycle.run_trial``: its four adapters (the Optuna worker, the
KerasTuner engine, reruns, confirmation seeds), each on 64 synthetic images and a tiny CNN in
this process, log the same tags, epoch metrics, hyperparameters and end state; a behaviour added
to ``run_trial``'s steps appears in all four; and a confirmation seed of a hypermodel trial
trains the hypermodel (it trained the plain CNN, and a champion was promoted on those numbers)."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import keras_tuner
import pytest
from mlflow.tracking import MlflowClient

from cifar_exp import lifecycle, rerun, track
from cifar_exp.config import Settings
from cifar_exp.config.sweepfile import parse_sweep
from cifar_exp.lifecycle import steps
from cifar_exp.registry import confirm
from cifar_exp.sweep import storage, tuner, worker
from cifar_exp.sweep.supervisor import start_parent_run
from cifar_exp.training import backend, hypermodel, programs
from tests.conftest import synthetic_splits

# Not marked keras: what is contracted here is backend-agnostic bookkeeping (tests/test_train.py
# and test_checkpoints.py train under every backend); under JAX it would add about a minute to CI.

CNN = """space:
  learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
fixed: {blocks: 1, filters: 4, convs_per_block: 1, dense_units: 0, batch_size: 16, bn_momentum: 0.9}
sampler: {name: random, seed: 3}
pruner: {name: none}
data: {source: synthetic}
epochs: 2
trials: 1
"""
HYPERMODEL = """hypermodel: tests.hypermodels.kt_docs:build_model
fixed: {batch_size: 16, translate: 0.0}
sampler: {name: random, seed: 3}
pruner: {name: none}
data: {source: synthetic}
epochs: 1
trials: 1
"""


class Store:
    """A sweep's study, MLflow experiment and parent run in ``folder``, on synthetic splits."""

    def __init__(self, folder: Path, name: str, text: str) -> None:
        self.sweep = parse_sweep(name, text, folder / f"{name}.yaml")
        self.settings = Settings(sweep=self.sweep, storage=str(folder / "optuna.journal"),
                                 tracking_uri=f"sqlite:///{folder}/mlflow.db", data_checksum="0")
        track.configure(self.settings.tracking_uri)
        self.study = storage.create_study(self.settings)
        self.experiment = track.experiment_id(self.sweep.name)
        self.parent = start_parent_run(self.settings, self.study, self.experiment)
        self.splits = synthetic_splits()
        self.client = MlflowClient(self.settings.tracking_uri)

    def optuna_trial(self, events: queue.Queue[Any] | None = None) -> str:
        """One trial by the Optuna worker (claimed and run as its loop does; what it tells the sweep
        command into ``events``); its run id."""
        one = worker.Worker(self.settings, self.experiment, self.parent, events or queue.Queue(), 0)
        one.splits, one.programs, one.identity = self.splits, programs.Programs(), backend.identity()
        one.tunable = hypermodel.load(self.sweep.hypermodel) if self.sweep.hypermodel else None
        opened = storage.open_storage(self.settings.storage)
        claimed = storage.claim(self.settings, opened)
        assert isinstance(claimed, storage.Claim)
        assert one.run_trial(claimed, time.perf_counter(), 0.0, opened)
        return str(self.study.trials[claimed.trial.number].user_attrs["mlflow_run_id"])

    def keras_tuner_trial(self) -> None:
        """One trial by the KerasTuner engine's ``run_trial``, as its tuner calls it."""
        trials = tuner._Trials(self.settings, self.experiment, self.parent, self.splits, lambda e, t: None, None)
        hp = keras_tuner.HyperParameters()
        tuner.declare(self.sweep, hp)
        trials.run_trial(keras_tuner.engine.trial.Trial(hp, trial_id="7"))

    def confirm(self, run_id: str, count: int) -> confirm.Seeds:
        trainer = confirm.Trainer(self.experiment, self.parent, backend.identity())
        trainer.splits = lambda original: self.splits  # type: ignore[method-assign]  (no data set to load)
        return trainer.confirm(run_id, count)

    def runs(self) -> list[Any]:
        return [r for r in self.client.search_runs([self.experiment]) if "engine" in r.data.tags
                and r.info.run_id != self.parent]


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A behaviour added to ``run_trial``'s steps, in this process: a metric each epoch, a tag at the end."""
    log, end = steps.Run._log, steps.end

    def logged(self: steps.Run, epoch: int, logs: Any) -> None:
        log(self, epoch, logs)
        track.log_metrics(self.run_id, {"probe": epoch + 1.0}, step=epoch)

    def ended(run_id: str, outcome: lifecycle.Outcome, extra: Any = None, trial: int | None = None,
              registrable: bool = False) -> None:
        end(run_id, outcome, {**(extra or {}), "probe": type(outcome).__name__}, trial=trial, registrable=registrable)

    monkeypatch.setattr(steps.Run, "_log", logged)
    monkeypatch.setattr(steps, "end", ended)


def test_every_adapter_logs_the_same_record_and_hears_a_behaviour_added_to_run_trial(
        tmp_path: Path, probed: None) -> None:
    store = Store(tmp_path, "contract", CNN)
    original = store.optuna_trial()
    store.keras_tuner_trial()
    _, comparison = rerun.rerun(rerun.load_original(original), store.splits, identity=backend.identity(),
                                deterministic=store.sweep.deterministic, tags={})
    differing = {k for row in comparison.epochs for k, (a, b) in row.items() if a != b} | \
        {k for k, (a, b) in comparison.test.items() if a != b}
    assert differing == {"probe"}  # same seed, same numbers; the probe is logged beside Keras' logs
    store.confirm(original, 2)
    runs = store.runs()
    by_engine: dict[str, list[Any]] = {}
    for run in runs:
        by_engine.setdefault(run.data.tags["engine"], []).append(run)
    assert {k: len(v) for k, v in by_engine.items()} == {"optuna": 1, "keras-tuner": 1, "rerun": 1,
                                                          "confirmation": 2}
    for run in runs:
        engine, tags, metrics = run.data.tags["engine"], run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and tags["state"] == "COMPLETE", engine
        assert tags["model_epoch"] in ("1", "2") and tags["compiled"] and tags["feed"], engine
        for recorded in ("sweep", "sweep_sha256", "sweep_seed", "data_checksum", "deterministic"):
            assert tags[recorded] == by_engine["optuna"][0].data.tags[recorded], (engine, recorded)
        assert {"seed", "epochs", "learning_rate", "batch_size"} <= set(run.data.params), engine
        history = store.client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [0, 1], engine  # every epoch, once
        assert "test_accuracy" in metrics and "time/fit_seconds" in metrics and "test_recall_a" in metrics, engine
        # the behaviour added to run_trial's steps, in every adapter
        assert tags["probe"] == "Completed" and metrics["probe"] == 2.0, engine
        assert ("model_uri" in tags) == (engine != "confirmation"), engine  # a seed keeps no model
    verdict = by_engine["rerun"][0].data.tags  # the comparison's, on the run it ended
    assert verdict["rerun_max_abs_diff"] == "0.0" and verdict["rerun_match"] == "false"  # the probe: missing


def test_a_trial_tells_its_engine_the_steps_inside_each_epoch(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_trial`` hands the engine the steps done inside an epoch (Keras' batch-begin hook, at
    most every PROGRESS_SECONDS; here every step); the Optuna adapter passes them to the sweep
    command between the trial's start and its epochs."""
    from cifar_exp.sweep import events

    monkeypatch.setattr(steps, "PROGRESS_SECONDS", 0.0)
    told: queue.Queue[Any] = queue.Queue()
    store = Store(tmp_path, "contract", CNN)
    store.optuna_trial(told)
    steps_in_epoch = -(-len(store.splits.y_train) // 16)  # batch 16
    heard = []
    while not told.empty():
        heard.append(told.get())
    kinds = [type(e).__name__ for e in heard]
    assert kinds[0] == "Started" and kinds[-1] == "Ended", kinds
    # told at the begin of every step but the first (steps done: 1 .. steps - 1)
    assert steps_in_epoch >= 3
    assert [(e.epoch, e.epochs, e.step, e.steps) for e in heard if isinstance(e, events.Steps)] == \
        [(epoch, 2, step, steps_in_epoch) for epoch in (1, 2) for step in range(1, steps_in_epoch)]
    assert kinds.index("Epoch") > kinds.index("Steps")  # epoch 1's steps before epoch 1 ends


def test_a_hypermodel_trial_is_confirmed_with_its_hypermodel(tmp_path: Path) -> None:
    store = Store(tmp_path, "hyper", HYPERMODEL)
    original = store.optuna_trial()
    found = store.confirm(original, 2)
    logged = store.client.get_run(original)
    for run_id in found.runs:
        seed = store.client.get_run(run_id)
        # the hypermodel's model (a dense network of its own size), not the sweep's default CNN
        assert seed.data.metrics["param_count"] == logged.data.metrics["param_count"]
        assert {k: v for k, v in seed.data.params.items() if k in ("num_layers", "units_0", "lr")} == \
            {k: v for k, v in logged.data.params.items() if k in ("num_layers", "units_0", "lr")}
        names = {a.path for a in store.client.list_artifacts(run_id)}
        assert "hyperparameters.json" in names
